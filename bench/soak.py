"""Soak the Ray Serve application for a long time and check that nothing leaks.

The long version of tests/test_reliability.py::test_soak_with_random_disconnects_leaks_nothing,
on the real default model. The application (deployments/app.py with the args of
serve_config.yaml, one LLM replica) runs in a private local Ray instance in this process,
as in bench/serve.py. A closed loop of C clients sends OpenAI streaming chat requests for
M minutes: random prompts (a question, sometimes earlier turns, a system prompt, filler
text), random max_tokens (8..128), random temperature, seed and ignore_eos, and a share of
the requests (--adapter-fraction) to the config's LoRA adapters. A fraction F of the
clients drop the connection after a random number of SSE events in every request.

Every S seconds the LLM replica's `diagnostics()` is read through a DeploymentHandle: RSS,
asyncio tasks, engine running/waiting/tracked requests, finished requests, generated
tokens; with the clients' counts of completed, dropped and failed requests. When the load
stops and the replica has settled, the leak checks: tracked_requests, running and waiting
are 0, the asyncio task count is back near its value before the load, the adapters are
unchanged, and no request failed. Reported, not checked (unless --max-rss-growth-mib):
RSS growth from the first sample after the warm-up to the end, and the slope of a linear
fit of RSS over the samples after the warm-up, in MiB/hour.

    python -m bench.soak                                   # 30 minutes, 16 clients
    python -m bench.soak --minutes 1 --concurrency 8 --sample-every 5 --plot /tmp/soak.png
    python -m bench.soak --output bench/soak-results.md --plot bench/soak.png

The report (markdown: samples and summary) goes to stdout and --output, the plot of RSS and
tasks over time to --plot; progress goes to logging. Ctrl-C stops the load early and still
reports (a second Ctrl-C aborts). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import math
import os
import platform
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.cli import fmt, publish, setup_logging
from bench.cpu import CpuSnapshot
from bench.engine import QUESTIONS
from bench.systems import SERVE_CONFIG, config_app_args, diagnostics, serve_app
from client import bodies
from client.stream import ErrorEvent, StreamError, aevent_data, decode_chunk
from deployments.contract.settings import AppArgs
from deployments.local import WORKER_NICENESS, llm_handle
from engine.loader import resolve_device, resolve_dtype

log = logging.getLogger("bench.soak")

MIB = 2**20
MAX_TOKENS_RANGE = (8, 128)  # each request's max_tokens, drawn uniformly
DROP_AFTER_EVENTS = (1, 16)  # a dropping client closes the connection after this many SSE events
MAX_EARLIER_TURNS = 2  # earlier user/assistant turns in a prompt
MAX_FILLER_WORDS = 120  # random words added to some prompts, for varied prompt lengths
TEMPERATURES = (0.0, 0.7)
WARMUP_REQUESTS = 2  # short requests before the baseline sample (they start the replica's gauge task)
WARMUP_TOKENS = 8
TASK_SLACK = 2  # asyncio tasks the replica may hold at the end beyond its idle count at the start
SETTLE_TIMEOUT_S = 60.0  # longest wait for the replica to become idle after the load
REQUEST_TIMEOUT_S = 300.0
ERROR_PAUSE_S = 0.5  # a client that saw an error waits this long before its next request
MAX_LOGGED_ERRORS = 5
MAX_WARMUP_S = 300.0  # the default warm-up is 10% of the run, between one sample period and this
WORDS = tuple(sorted({w.strip("?.,'!").lower() for q in QUESTIONS for w in q.split()} - {""}))
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a patient teacher.")

COMPLETED = "completed"
DROPPED = "dropped"


@dataclass(frozen=True)
class Sample:
    """One reading of the replica's diagnostics, with the clients' counts at that moment."""

    t: float  # seconds since the load started (0 for the baseline before it)
    phase: str  # "start" (idle, before the load), "warm-up", "load", "drain" (last requests), "end" (idle)
    rss_mib: float
    tasks: int
    running: int
    waiting: int
    tracked: int
    finished: int
    generated_tokens: int
    adapters: tuple[str, ...]
    completed: int
    dropped: int
    errors: int
    kv_blocks_used: int = 0  # KV-cache blocks held by requests


@dataclass
class ClientCounts:
    """What the clients saw, shared by all of them (one event loop: no locking needed)."""

    completed: int = 0
    dropped: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def record(self, outcome: str, detail: str) -> None:
        """Count one request's outcome; log the first few errors."""
        if outcome == COMPLETED:
            self.completed += 1
        elif outcome == DROPPED:
            self.dropped += 1
        else:
            self.errors[outcome] += 1
            if self.error_count <= MAX_LOGGED_ERRORS:
                log.warning("request failed: %s: %s", outcome, detail[:300])


@dataclass(frozen=True)
class Check:
    """One pass/fail line of the summary."""

    name: str
    value: str
    ok: bool


# ----- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--model", help="model to serve (default: the model of --config's args, with its adapters)")
    p.add_argument("--disconnect-fraction", type=float, default=1 / 3,
                   help="fraction of the clients that drop every request after a random number of SSE events")
    p.add_argument("--adapter-fraction", type=float, default=0.25,
                   help="fraction of the requests sent to one of the config's LoRA adapters (none with --model)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between two diagnostics samples")
    p.add_argument("--warmup-s", type=float,
                   help=f"seconds of load before the RSS reference sample (default: 10%% of the run, "
                        f"at least one sample period, at most {MAX_WARMUP_S:g})")
    p.add_argument("--settle-s", type=float, default=5.0, help="pause after the load before the leak checks")
    p.add_argument("--max-rss-growth-mib", type=float,
                   help="also fail when RSS grows more than this after the warm-up (default: report only)")
    p.add_argument("--config", type=Path, default=SERVE_CONFIG, help="serve config whose first application's args to use")
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' random choices")
    p.add_argument("--ray-logs", action="store_true", help="show the Ray workers' logs")
    p.add_argument("--ray-worker-niceness", type=int, default=WORKER_NICENESS,
                   help="niceness of the Ray workers (Ray's own default is 15)")
    p.add_argument("--output", type=Path, help="also write the report as markdown to this file")
    p.add_argument("--plot", type=Path, help="PNG plot of RSS and tasks over time")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the options; fill in the default warm-up."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.sample_every <= 0 or args.settle_s < 0:
        parser.error("--minutes, --concurrency and --sample-every must be positive, --settle-s not negative")
    if not (0 <= args.disconnect_fraction <= 1 and 0 <= args.adapter_fraction <= 1):
        parser.error("--disconnect-fraction and --adapter-fraction must be between 0 and 1")
    if args.warmup_s is None:
        args.warmup_s = min(max(0.1 * args.minutes * 60, args.sample_every), MAX_WARMUP_S)
    return args


def app_args(config: Path, model: str | None) -> dict[str, Any]:
    """The serve config's first application args; --model replaces the model and drops its adapters."""
    values = config_app_args(config)
    if model:
        values["model"] = model
        for key in ("served_model_name", "adapters", "preload_adapters"):
            values.pop(key, None)
    return values


@dataclass(frozen=True)
class Models:
    """What the clients ask for: the base model, or now and then one of the adapters."""

    base: str
    adapters: tuple[str, ...]
    adapter_fraction: float

    @classmethod
    def of(cls, values: dict[str, Any], adapter_fraction: float) -> Models:
        """The served names of the application's base model and adapters."""
        app = AppArgs.model_validate(values)
        return cls(app.model_name, tuple(app.adapters), adapter_fraction if app.adapters else 0.0)

    def pick(self, rng: random.Random) -> str:
        """A random adapter for `adapter_fraction` of the calls, else the base model."""
        if self.adapters and rng.random() < self.adapter_fraction:
            return rng.choice(self.adapters)
        return self.base


# ----- clients ------------------------------------------------------------------------------


def random_messages(rng: random.Random) -> list[dict[str, str]]:
    """A chat of 1 to 1 + MAX_EARLIER_TURNS user turns, sometimes with a system prompt and filler."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randint(0, MAX_EARLIER_TURNS)):
        messages.append({"role": "user", "content": rng.choice(QUESTIONS)})
        messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))})
    question = rng.choice(QUESTIONS)
    if rng.random() < 0.5:
        question += " Context: " + " ".join(rng.choices(WORDS, k=rng.randint(1, MAX_FILLER_WORDS)))
    messages.append({"role": "user", "content": f"{question} (#{rng.randrange(10**6)})"})
    return messages


def chat_body(model: str, rng: random.Random) -> dict[str, Any]:
    """A streaming chat request to `model` with random messages, max_tokens and sampling."""
    return bodies.chat_body(model, random_messages(rng), max_tokens=rng.randint(*MAX_TOKENS_RANGE),
                            temperature=rng.choice(TEMPERATURES), seed=rng.randrange(2**31),
                            ignore_eos=rng.random() < 0.5)


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], drop_after: int | None) -> tuple[str, str]:
    """Send one request and read its SSE stream to [DONE], or drop it after `drop_after` events.

    Returns (outcome, detail): COMPLETED, DROPPED, or an error kind with its detail.
    """
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return f"HTTP {response.status_code}", text
            events = 0
            async for data in aevent_data(response):
                if decode_chunk(data) is None:
                    return COMPLETED, ""
                events += 1
                if drop_after is not None and events >= drop_after:
                    return DROPPED, ""  # leaving the block closes the connection mid-stream
            return "stream ended without [DONE]", ""
    except ErrorEvent as err:
        return "error event", str(err)
    except (httpx.HTTPError, StreamError) as err:  # StreamError: an event that is not a JSON object
        return type(err).__name__, str(err) or repr(err)


async def client_loop(client: httpx.AsyncClient, models: Models, rng: random.Random, drops: bool,
                      counts: ClientCounts, stop: asyncio.Event) -> None:
    """Send requests one after another until `stop` is set; a dropping client drops every one."""
    while not stop.is_set():
        drop_after = rng.randint(*DROP_AFTER_EVENTS) if drops else None
        outcome, detail = await one_request(client, chat_body(models.pick(rng), rng), drop_after)
        counts.record(outcome, detail)
        if outcome not in (COMPLETED, DROPPED):
            await asyncio.sleep(ERROR_PAUSE_S)


def dropping_clients(concurrency: int, fraction: float) -> int:
    """How many of the clients drop their requests."""
    return min(concurrency, round(concurrency * fraction))


# ----- diagnostics --------------------------------------------------------------------------


def to_sample(diag: dict[str, Any], t: float, phase: str, counts: ClientCounts) -> Sample:
    """A Sample from one diagnostics() answer and the clients' counts."""
    stats = diag["stats"]
    return Sample(t, phase, diag["rss_bytes"] / MIB, diag["tasks"], stats.running, stats.waiting,
                  stats.tracked_requests, stats.finished_requests, stats.generated_tokens,
                  tuple(diag["adapters"]), counts.completed, counts.dropped, counts.error_count,
                  stats.kv_blocks_used)


def log_sample(s: Sample) -> None:
    """One progress line per sample."""
    log.info("t=%6.0f s %-7s RSS %7.1f MiB, tasks %3d, running %2d, waiting %2d, tracked %2d, "
             "finished %6d, tokens %8d | completed %5d, dropped %5d, errors %d",
             s.t, s.phase, s.rss_mib, s.tasks, s.running, s.waiting, s.tracked, s.finished,
             s.generated_tokens, s.completed, s.dropped, s.errors)


async def sampler(handle: Any, started: float, every: float, warmup_s: float, counts: ClientCounts,
                  load_stopped: asyncio.Event, clients_done: asyncio.Event, samples: list[Sample]) -> None:
    """At every multiple of `every` seconds after `started`, append a sample, until `clients_done` is set.

    Samples taken after `load_stopped` (while the clients finish their last requests) are
    marked "drain" and, like the warm-up's, left out of the RSS fit. A slow answer skips
    the ticks it overran rather than sampling in a burst.
    """
    while True:
        next_tick = (math.floor((time.monotonic() - started) / every) + 1) * every
        try:
            await asyncio.wait_for(clients_done.wait(), max(started + next_tick - time.monotonic(), 0))
            return
        except asyncio.TimeoutError:
            pass
        t = time.monotonic() - started
        phase = "drain" if load_stopped.is_set() else "warm-up" if t < warmup_s else "load"
        try:
            diag = await diagnostics(handle)
        except Exception as err:  # one missed sample is not worth ending a long soak for
            log.warning("t=%.0f s: diagnostics() failed: %s", t, err)
            continue
        sample = to_sample(diag, t, phase, counts)
        samples.append(sample)
        log_sample(sample)


def idle(diag: dict[str, Any], max_tasks: int | None) -> bool:
    """No request left in the engine, and at most `max_tasks` asyncio tasks (when given)."""
    stats = diag["stats"]
    return (stats.tracked_requests == 0 and stats.running == 0 and stats.waiting == 0
            and (max_tasks is None or diag["tasks"] <= max_tasks))


async def settled(handle: Any, settle_s: float, max_tasks: int | None = None) -> dict[str, Any]:
    """Wait `settle_s`, then up to SETTLE_TIMEOUT_S for the replica to be idle; its last diagnostics."""
    await asyncio.sleep(settle_s)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    diag = await diagnostics(handle)
    while not idle(diag, max_tasks) and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        diag = await diagnostics(handle)
    return diag


# ----- the run --------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """Everything the report needs."""

    samples: list[Sample]
    counts: ClientCounts
    load_s: float  # from the start of the load until the clients were told to stop
    drain_s: float  # then until their last requests ended
    interrupted: bool
    own_cores: float
    other_cores: float


async def warm_up(client: httpx.AsyncClient, models: Models) -> None:
    """A few short requests (one per adapter too), so first-request work is done before the baseline."""
    rng = random.Random(-1)
    for model in [models.base] * WARMUP_REQUESTS + list(models.adapters if models.adapter_fraction else ()):
        body = chat_body(model, rng) | {"max_tokens": WARMUP_TOKENS}
        outcome, detail = await one_request(client, body, None)
        if outcome != COMPLETED:
            raise RuntimeError(f"warm-up request failed: {outcome}: {detail[:300]}")


def stop_on_interrupt(stop: asyncio.Event) -> None:
    """The first Ctrl-C sets `stop` (the run ends early and still reports); the next one aborts."""
    loop = asyncio.get_running_loop()

    def handler() -> None:
        log.warning("interrupted: stopping the load (Ctrl-C again to abort)")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        pass


async def soak(url: str, models: Models, args: argparse.Namespace) -> SoakResult:
    """Warm up, take the baseline, run the load with the sampler, settle, take the final sample."""
    handle = llm_handle()
    counts = ClientCounts()
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        log.info("warming up (%d tokens per request)", WARMUP_TOKENS)
        await warm_up(client, models)
        baseline = to_sample(await settled(handle, 1.0), 0.0, "start", counts)
        log_sample(baseline)
        samples = [baseline]
        stop = asyncio.Event()
        stop_on_interrupt(stop)
        droppers = dropping_clients(args.concurrency, args.disconnect_fraction)
        log.info("load: %d clients (%d dropping) for %g min, a sample every %g s, warm-up %g s",
                 args.concurrency, droppers, args.minutes, args.sample_every, args.warmup_s)
        cpu = CpuSnapshot.take()
        started = time.monotonic()
        clients = [asyncio.create_task(client_loop(client, models, random.Random(args.seed * 1000 + i),
                                                   i < droppers, counts, stop)) for i in range(args.concurrency)]
        clients_done = asyncio.Event()
        sampling = asyncio.create_task(
            sampler(handle, started, args.sample_every, args.warmup_s, counts, stop, clients_done, samples))
        try:
            await asyncio.wait_for(stop.wait(), args.minutes * 60)
            interrupted = True
        except asyncio.TimeoutError:
            interrupted = False
        stop.set()
        load_s = time.monotonic() - started
        log.info("load stopped; waiting for the clients' last requests")
        try:
            await asyncio.gather(*clients)
        finally:
            clients_done.set()
            await sampling
    drain_s = time.monotonic() - started - load_s
    own, other = CpuSnapshot.take().cores_since(cpu, load_s + drain_s)
    log.info("settling for %g s (then up to %g s until idle)", args.settle_s, SETTLE_TIMEOUT_S)
    final = to_sample(await settled(handle, args.settle_s, baseline.tasks + TASK_SLACK),
                      time.monotonic() - started, "end", counts)
    log_sample(final)
    samples.append(final)
    return SoakResult(samples, counts, load_s, drain_s, interrupted, own, other)


# ----- analysis -----------------------------------------------------------------------------


def after_warmup(samples: Sequence[Sample]) -> list[Sample]:
    """The load samples from the end of the warm-up on."""
    return [s for s in samples if s.phase == "load"]


def slope_per_hour(samples: Sequence[Sample]) -> float:
    """Least-squares slope of RSS against time, MiB/hour; NaN with fewer than two samples."""
    if len(samples) < 2:
        return math.nan
    ts = [s.t / 3600 for s in samples]
    ys = [s.rss_mib for s in samples]
    mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return math.nan
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / var


def second_half(load: Sequence[Sample]) -> list[Sample]:
    """The later half of the load samples (`after_warmup`): where a leak still climbs and a heap
    reaching its working size (glibc keeps freed KV-cache blocks for reuse) has levelled off."""
    return list(load[len(load) // 2:])


def rss_reference(samples: Sequence[Sample]) -> Sample:
    """The first sample after the warm-up; the baseline when the run was too short to have one."""
    later = after_warmup(samples)
    return later[0] if later else samples[0]


def leak_checks(result: SoakResult, max_rss_growth_mib: float | None) -> list[Check]:
    """The pass/fail lines: nothing left in the engine, tasks back near the start, no failures."""
    start, end = result.samples[0], result.samples[-1]
    counts = result.counts
    checks = [
        Check("engine tracked_requests == 0 at the end", str(end.tracked), end.tracked == 0),
        Check("engine running == 0 at the end", str(end.running), end.running == 0),
        Check("engine waiting == 0 at the end", str(end.waiting), end.waiting == 0),
        Check("KV-cache blocks held == 0 at the end", str(end.kv_blocks_used), end.kv_blocks_used == 0),
        Check(f"asyncio tasks <= start + {TASK_SLACK}", f"{end.tasks} (start {start.tasks})",
              end.tasks <= start.tasks + TASK_SLACK),
        Check("loaded adapters unchanged", f"{list(end.adapters)} (start {list(start.adapters)})",
              end.adapters == start.adapters),
        Check("client errors == 0", error_summary(counts), counts.error_count == 0),
        Check("requests completed > 0", str(counts.completed), counts.completed > 0),
    ]
    if max_rss_growth_mib is not None:
        growth = end.rss_mib - rss_reference(result.samples).rss_mib
        checks.append(Check(f"RSS growth after warm-up <= {max_rss_growth_mib:g} MiB", f"{growth:.1f} MiB",
                            growth <= max_rss_growth_mib))
    return checks


def error_summary(counts: ClientCounts) -> str:
    """'0', or the total with its kinds."""
    if not counts.errors:
        return "0"
    kinds = ", ".join(f"{kind}: {n}" for kind, n in counts.errors.most_common())
    return f"{counts.error_count} ({kinds})"


# ----- report -------------------------------------------------------------------------------


def header(values: dict[str, Any], args: argparse.Namespace, models: Models, result: SoakResult) -> list[str]:
    """Markdown lines describing what ran where."""
    config = AppArgs.model_validate(values).engine_config()
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    droppers = dropping_clients(args.concurrency, args.disconnect_fraction)
    stopped = "stopped early by Ctrl-C after" if result.interrupted else "for"
    adapters = (f"{models.adapter_fraction:.0%} of the requests to an adapter ({', '.join(models.adapters)})"
                if models.adapter_fraction else "no adapter requests")
    return [
        f"# Soak benchmark ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "",
        f"- model: {values.get('model')}, dtype {dtype}, {adapters}; host "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        f"- serve: args of {args.config.name} (max_batch_size {values.get('max_batch_size')}, num_cpus "
        f"{values.get('num_cpus')}), one LLM replica, a private local Ray (2 CPUs), clients in this process",
        f"- load: {args.concurrency} closed-loop clients {stopped} {result.load_s / 60:.1f} min "
        f"(then {result.drain_s:.0f} s for their last requests to end); streaming chat, "
        f"random prompts, max_tokens {MAX_TOKENS_RANGE[0]}..{MAX_TOKENS_RANGE[1]}, temperature {TEMPERATURES}, "
        f"random seed and ignore_eos; {droppers} of the clients drop every request after "
        f"{DROP_AFTER_EVENTS[0]}..{DROP_AFTER_EVENTS[1]} SSE events",
        f"- samples: the LLM replica's diagnostics() every {args.sample_every:g} s; warm-up {args.warmup_s:g} s; "
        f"`start` is the idle replica before the load, `drain` while the clients finish their last requests, "
        f"`end` the replica {args.settle_s:g} s or more after that; the RSS fit uses the `load` samples",
        f"- CPU cores busy during the load and drain: {fmt(result.own_cores)} by this benchmark (clients, Ray, model), "
        f"{fmt(result.other_cores)} by other processes (other work skews throughput, not the leak checks)",
    ]


def samples_table(samples: Sequence[Sample]) -> list[str]:
    """The samples as markdown table lines; tok/s is the generated tokens since the previous sample."""
    lines = [
        "## Samples",
        "",
        "| t s | phase | RSS MiB | tasks | running | waiting | tracked | finished | tokens | tok/s "
        "| completed | dropped | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous: Sample | None = None
    for s in samples:
        rate = math.nan
        if previous is not None and s.t > previous.t:
            rate = (s.generated_tokens - previous.generated_tokens) / (s.t - previous.t)
        lines.append(f"| {s.t:.0f} | {s.phase} | {s.rss_mib:.1f} | {s.tasks} | {s.running} | {s.waiting} "
                     f"| {s.tracked} | {s.finished} | {s.generated_tokens} | {fmt(rate, 1)} | {s.completed} "
                     f"| {s.dropped} | {s.errors} |")
        previous = s
    return lines


def summary(result: SoakResult, checks: Sequence[Check]) -> list[str]:
    """RSS growth and slope, request counts, and the checks."""
    start, end = result.samples[0], result.samples[-1]
    reference = rss_reference(result.samples)
    fitted = after_warmup(result.samples)
    late = second_half(fitted)
    late_start = f" from t={late[0].t:.0f} s" if late else ""
    counts = result.counts
    total = counts.completed + counts.dropped + counts.error_count
    tokens = end.generated_tokens - start.generated_tokens
    busy_s = result.load_s + result.drain_s
    ok = all(c.ok for c in checks)
    lines = [
        "## Summary",
        "",
        f"- requests: {total} ({counts.completed} completed, {counts.dropped} dropped mid-stream, "
        f"{error_summary(counts)} failed), {total / busy_s * 60:.0f}/min; "
        f"{tokens} tokens generated, {tokens / busy_s:.1f} tok/s (over the load and the drain)",
        f"- RSS: {start.rss_mib:.1f} MiB before the load, {reference.rss_mib:.1f} MiB at t={reference.t:.0f} s "
        f"(first sample after the warm-up), {end.rss_mib:.1f} MiB at the end: "
        f"**{end.rss_mib - reference.rss_mib:+.1f} MiB** after the warm-up, "
        f"max {max(s.rss_mib for s in result.samples):.1f} MiB",
        f"- RSS slope (least squares over the {len(fitted)} samples after the warm-up): "
        f"**{fmt(slope_per_hour(fitted), 1)} MiB/hour**; over the second half of the load "
        f"({len(late)} samples{late_start}): **{fmt(slope_per_hour(late), 1)} MiB/hour**",
        f"- asyncio tasks: {start.tasks} before the load, max {max(s.tasks for s in result.samples)} during it, "
        f"{end.tasks} at the end",
        "",
        "| check | value | result |",
        "|---|---|---|",
        *(f"| {c.name} | {c.value} | {'pass' if c.ok else '**FAIL**'} |" for c in checks),
        "",
        f"**{'PASS' if ok else 'FAIL'}**: {sum(c.ok for c in checks)}/{len(checks)} checks passed",
    ]
    return lines


def report(values: dict[str, Any], args: argparse.Namespace, models: Models, result: SoakResult,
           checks: Sequence[Check]) -> str:
    """The whole markdown report: header, summary, samples."""
    lines = header(values, args, models, result) + [""] + summary(result, checks) + [""] + samples_table(result.samples)
    return "\n".join(lines) + "\n"


def plot(result: SoakResult, warmup_s: float, path: Path) -> None:
    """RSS (with the fit after the warm-up) and asyncio tasks / engine rows over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.samples
    minutes = [s.t / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.plot(minutes, [s.rss_mib for s in samples], marker=".", label="replica RSS")
    fitted = after_warmup(samples)
    slope = slope_per_hour(fitted)
    if not math.isnan(slope):
        mean_t = sum(s.t for s in fitted) / len(fitted) / 3600
        mean_y = sum(s.rss_mib for s in fitted) / len(fitted)
        ends = [fitted[0].t, fitted[-1].t]
        top.plot([t / 60 for t in ends], [mean_y + slope * (t / 3600 - mean_t) for t in ends],
                 linestyle="--", label=f"fit after warm-up: {slope:.1f} MiB/h")
    top.set_ylabel("MiB")
    top.set_title("LLM replica resident memory")
    bottom.plot(minutes, [s.tasks for s in samples], marker=".", label="asyncio tasks")
    bottom.plot(minutes, [s.running + s.waiting for s in samples], marker=".", label="engine running + waiting")
    bottom.plot(minutes, [s.tracked for s in samples], marker=".", label="engine tracked requests")
    bottom.axhline(samples[0].tasks + TASK_SLACK, color="gray", linestyle=":", label="task limit at the end")
    bottom.set_ylabel("count")
    bottom.set_xlabel("minutes since the load started")
    bottom.set_title("replica tasks and requests")
    for axis in (top, bottom):
        axis.axvspan(0, warmup_s / 60, color="gray", alpha=0.12, label="warm-up" if axis is top else None)
        axis.axvspan(result.load_s / 60, (result.load_s + result.drain_s) / 60, color="orange", alpha=0.12,
                     label="drain (last requests)" if axis is top else None)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("plot written to %s", path)


# ----- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[str, bool]:
    """Start the application, soak it, shut it down; return the report and whether all checks passed."""
    values = app_args(args.config, args.model)
    models = Models.of(values, args.adapter_fraction)
    log.info("starting Ray and the application (%s, adapters %s)", models.base, list(models.adapters))
    with serve_app(values, args.ray_logs, args.ray_worker_niceness) as url:
        log.info("up at %s", url)
        result = asyncio.run(soak(url, models, args))
    checks = leak_checks(result, args.max_rss_growth_mib)
    for check in checks:
        (log.info if check.ok else log.error)("%s: %s: %s", "pass" if check.ok else "FAIL", check.name, check.value)
    if args.plot:
        plot(result, args.warmup_s, args.plot)
    return report(values, args, models, result, checks), all(c.ok for c in checks)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    markdown, ok = run(args)
    publish(markdown, args.output)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
