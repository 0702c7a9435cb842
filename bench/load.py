"""Load generation for bench.serve: closed-loop clients and what one concurrency level measured.

A level: N clients each send requests one after another (the questions of bench.engine in
turn) until the level's count is sent; each request's stream is timed by bench.client.measure,
the CPU of this process tree and of everything else is sampled around the level, and our
engine's step counters are read before and after when a probe is given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from bench.client import Chunk, RequestResult, measure
from bench.cpu import CpuSnapshot
from bench.percentiles import safe_percentile
from bench.workloads import WorkRequest, fixed_requests
from engine.engine import EngineStats

log = logging.getLogger("bench.serve")

MIN_REQUESTS = 8
# Requests per level = WAVES x concurrency: enough turnovers of every client that a level is
# not dominated by its start (all clients arriving at once into an empty batch); run-to-run
# spread of serve / engine at concurrency 32 was about +-0.05 with 2 waves on 2 cores.
WAVES = 4
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 8
MAX_LOGGED_ERRORS = 3


Transport = Callable[[str, int], AsyncIterator[Chunk]]
"""(user message, max_tokens) -> the request's stream of Chunks; raises RequestFailed on errors."""

StatsProbe = Callable[[], Awaitable[EngineStats]]
"""Reads our engine's counters (in this process, or the LLM replica's through a handle)."""


@dataclass(frozen=True)
class EngineSteps:
    """Our engine's steps during one level: how busy it was and how big its steps were."""

    steps: int
    seconds: float
    rows: int
    tokens: int

    @classmethod
    def between(cls, before: EngineStats, after: EngineStats) -> EngineSteps:
        return cls(after.steps - before.steps, after.step_seconds - before.step_seconds,
                   after.step_rows - before.step_rows, after.step_tokens - before.step_tokens)

    def cells(self, wall: float) -> str:
        """Table cells: steps, rows per step, ms per step, share of the wall time in steps."""
        if not self.steps:
            return "| 0 | - | - | - "
        return (f"| {self.steps} | {self.rows / self.steps:.1f} | {1000 * self.seconds / self.steps:.1f} "
                f"| {self.seconds / wall:.2f} ")


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level of one system."""

    system: str
    concurrency: int
    wall: float
    results: tuple[RequestResult, ...]
    own_cores: float = math.nan  # CPU cores this process tree kept busy on average
    other_cores: float = math.nan  # CPU cores every other process kept busy on average
    engine: EngineSteps | None = None  # our engine's steps (serve and engine systems only)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall if self.wall else math.nan

    def ttft(self, q: float) -> float:
        return safe_percentile([r.ttft for r in self.ok if r.ttft is not None], q)

    def latency(self, q: float) -> float:
        return safe_percentile([r.latency for r in self.ok], q)

    def itl(self, q: float) -> float:
        return safe_percentile([g for r in self.ok for g in r.gaps], q)

    def tpot(self, q: float) -> float:
        """Time per output token after the first, per request."""
        return safe_percentile([r.tpot for r in self.ok if r.tpot is not None], q)

    @property
    def chunks_per_token(self) -> float:
        tokens = sum(r.tokens for r in self.ok)
        return sum(r.chunks for r in self.ok) / tokens if tokens else math.nan


def requests_per_level(args: argparse.Namespace, concurrency: int) -> int:
    """--requests if given, else max(WAVES x concurrency, MIN_REQUESTS)."""
    return args.requests or max(WAVES * concurrency, MIN_REQUESTS)


async def run_level(transport: Transport, system: str, concurrency: int, requests: Sequence[WorkRequest],
                    probe: StatsProbe | None = None) -> LevelResult:
    """`concurrency` clients each send requests one after another until every one of `requests`
    was sent (in order); `probe` reads our engine's step counters before and after."""
    pending = iter(requests)  # shared by the clients: each next() hands out one request
    results: list[RequestResult] = []

    async def client() -> None:
        for request in pending:
            result = await measure(transport(request.message, request.max_tokens))
            if result.error is None and result.tokens != request.max_tokens:
                log.warning("%s c=%d: %d tokens, not %d", system, concurrency, result.tokens, request.max_tokens)
            results.append(result)

    before = await probe() if probe else None
    cpu = CpuSnapshot.take()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    own, other = CpuSnapshot.take().cores_since(cpu, wall)
    steps = EngineSteps.between(before, await probe()) if probe else None
    level = LevelResult(system, concurrency, wall, tuple(results), own, other, steps)
    log_level(level)
    return level


def log_level(level: LevelResult) -> None:
    """One progress line per level, and the first few errors."""
    log.info("%s c=%d: %d requests in %.1f s, %.1f tok/s, TTFT p50 %.3f s, %d errors, "
             "CPU cores: %.2f ours, %.2f others",
             level.system, level.concurrency, len(level.results), level.wall, level.tokens_per_s,
             level.ttft(50), level.errors, level.own_cores, level.other_cores)
    if level.engine and level.engine.steps:
        steps = level.engine
        log.info("%s c=%d: engine %d steps, %.1f rows/step, %.1f ms/step, busy %.2f", level.system,
                 level.concurrency, steps.steps, steps.rows / steps.steps, 1000 * steps.seconds / steps.steps,
                 steps.seconds / level.wall)
    for result in [r for r in level.results if r.error][:MAX_LOGGED_ERRORS]:
        log.warning("%s c=%d: request failed: %s", level.system, level.concurrency, result.error)


async def run_levels(transport: Transport, system: str, args: argparse.Namespace,
                     probe: StatsProbe | None = None) -> list[LevelResult]:
    """An untimed warm-up, then every concurrency level in turn, each sending
    `args.plan[concurrency]` (the same request list for every system)."""
    log.info("%s: warming up (%d x %d tokens)", system, WARMUP_REQUESTS, WARMUP_TOKENS)
    await run_level(transport, f"{system} warm-up", WARMUP_REQUESTS, fixed_requests(WARMUP_REQUESTS, WARMUP_TOKENS))
    levels = []
    for concurrency in args.concurrency:
        requests = args.plan[concurrency]
        log.info("%s: concurrency %d, %d requests, %d reply tokens in all", system, concurrency, len(requests),
                 sum(r.max_tokens for r in requests))
        levels.append(await run_level(transport, system, concurrency, requests, probe))
    return levels
