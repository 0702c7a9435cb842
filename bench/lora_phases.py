"""How a bench.lora_serving worker drives a system through one phase, and what it records.

- unloaded: the requests one after another, each adapter made resident first (untimed): the
  system's latency with nothing else to do (the SLO's reference);
- closed: `concurrency` clients each sending the next request as soon as their last finished
  (the system's saturation throughput);
- open: every request at its arrival time whatever the system is doing; requests not finished
  `cutoff` seconds after the start are cancelled and stay unfinished.

A request that the system refuses or fails gets its error in its Outcome (and is counted as
an error in the report), so one failure does not end the run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from bench.cpu import CpuSnapshot
from bench.lora_outcomes import EngineSteps, Outcome, Phase, PhaseResult
from bench.lora_workload import TraceRequest

log = logging.getLogger("bench.lora_serving")

MAX_LOGGED_ERRORS = 3
WARMUP_TOKENS = 8  # tokens of each untimed warm-up request

Clock = Callable[[], float]
"""Seconds since the current phase started."""


class ServedSystem(Protocol):
    """What the phase drivers call: `warm_up` (untimed base-model requests), `warm` (make an
    adapter resident, untimed), `serve` (one request, filling in its Outcome as it goes), `cut`
    (after a phase's cutoff: nothing may still write to an Outcome once it returns), the
    adapter counters ((loads, evictions) so far, None where unknown), the engine's step
    counters (None without an engine), `close`."""

    async def warm_up(self, prompt: list[int]) -> None: ...
    async def warm(self, adapter: str) -> None: ...
    async def serve(self, request: TraceRequest, prompt: list[int], outcome: Outcome, clock: Clock) -> None: ...
    async def cut(self) -> None: ...
    def adapter_counters(self) -> tuple[int | None, int | None]: ...
    def steps(self) -> EngineSteps | None: ...
    async def close(self) -> None: ...


async def run_phase(system: ServedSystem, phase: Phase) -> PhaseResult:
    """Run `phase` on `system` and measure it: outcomes, wall time, adapter and step counters, CPU."""
    loads, evictions = system.adapter_counters()
    steps = system.steps()
    cpu = CpuSnapshot.take()
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    outcomes = await DRIVERS[phase.mode](system, phase, clock)
    wall = clock()
    own, other = CpuSnapshot.take().cores_since(cpu, wall)
    after_loads, after_evictions = system.adapter_counters()
    result = PhaseResult(phase.name, outcomes, wall, difference(after_loads, loads),
                         difference(after_evictions, evictions), steps_between(steps, system.steps()), own, other)
    log_phase(result)
    return result


async def unloaded(system: ServedSystem, phase: Phase, clock: Clock) -> list[Outcome]:
    outcomes = []
    for request, prompt in zip(phase.requests, phase.prompts):
        await system.warm(request.adapter)
        outcomes.append(outcome := Outcome.of(request, clock()))
        await served(system, request, prompt, outcome, clock)
    return outcomes


async def closed(system: ServedSystem, phase: Phase, clock: Clock) -> list[Outcome]:
    work = iter(zip(phase.requests, phase.prompts))  # shared: each next() hands out one request
    outcomes: list[Outcome] = []

    async def client() -> None:
        for request, prompt in work:
            outcomes.append(outcome := Outcome.of(request, clock()))
            await served(system, request, prompt, outcome, clock)

    await asyncio.gather(*(client() for _ in range(phase.concurrency)))
    return sorted(outcomes, key=lambda o: o.index)


async def open_loop(system: ServedSystem, phase: Phase, clock: Clock) -> list[Outcome]:
    outcomes = [Outcome.of(r, r.arrival) for r in phase.requests]

    async def arrive(request: TraceRequest, prompt: list[int], outcome: Outcome) -> None:
        await asyncio.sleep(max(0.0, request.arrival - clock()))
        await served(system, request, prompt, outcome, clock)

    tasks = [asyncio.create_task(arrive(r, p, o)) for r, p, o in zip(phase.requests, phase.prompts, outcomes)]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=None if math.isinf(phase.cutoff) else phase.cutoff)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.info("cutoff at %.0f s: %d requests unfinished", phase.cutoff, len(pending))
    await system.cut()
    return outcomes


DRIVERS = {"unloaded": unloaded, "closed": closed, "open": open_loop}


async def served(system: ServedSystem, request: TraceRequest, prompt: list[int], outcome: Outcome,
                 clock: Clock) -> None:
    """`system.serve`, with a refusal or failure recorded in the outcome instead of raised."""
    try:
        await system.serve(request, prompt, outcome, clock)
    except Exception as err:  # any failure of one request is a measured outcome (the report counts it)
        outcome.error = f"{type(err).__name__}: {err}"


def difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def steps_between(before: EngineSteps | None, after: EngineSteps | None) -> EngineSteps | None:
    if before is None or after is None:
        return None
    return EngineSteps(after.steps - before.steps, after.seconds - before.seconds, after.rows - before.rows)


def log_phase(result: PhaseResult) -> None:
    """One progress line per phase, and the first few errors."""
    done = [o for o in result.outcomes if o.done]
    tokens = sum(o.tokens for o in result.outcomes)
    log.info("%s: %d/%d requests done in %.1f s, %.1f tok/s, %d cold, loads %s, CPU others %.2f",
             result.name, len(done), len(result.outcomes), result.wall, tokens / result.wall if result.wall else 0.0,
             sum(o.cold for o in result.outcomes), result.loads, result.other_cores)
    for outcome in [o for o in result.outcomes if o.error][:MAX_LOGGED_ERRORS]:
        log.warning("%s: request %d (%s) failed: %s", result.name, outcome.index, outcome.adapter, outcome.error)
