"""The engine systems bench.lora_serving measures, inside a worker process (bench/lora_worker.py);
each is a ServedSystem (bench/lora_phases.py).

- ours: the current engine with an adapter store: per request `engine.ensure_adapter(name)`
  (returns the seconds it waited for a load, 0.0 when the adapter was in memory), then
  `engine.submit`.
- before: the engine of the code before issue #24 (the worker imports another checkout's
  `engine`), which serves only adapters loaded with `load_adapter`; the server around it kept
  them in Ray Serve's multiplexer, emulated here by LruAdapters.
- peft: one PeftModel and `generate` per request (bench/lora_peft.py).

Imports the `engine` package: import this module only after bench.lora_worker has chosen
which checkout's engine to use.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.lora_outcomes import EngineSteps, Job, Outcome
from bench.lora_phases import WARMUP_TOKENS, Clock
from bench.lora_workload import TraceRequest
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.request import GenerationRequest

try:  # a stream ends with a RequestEnd since issue #27; the "before" checkout's with its last delta
    from engine.request import RequestEnd
except ImportError:
    RequestEnd = None

WARMUP_REQUESTS = 2


def greedy(tokens: int) -> SamplingParams:
    """Greedy sampling of exactly `tokens` tokens."""
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


class AdapterPolicy(Protocol):
    """How an engine system makes a request's adapter usable before it submits."""

    async def acquire(self, name: str) -> float:
        """Seconds the caller waited for loads (0.0 when the adapter was resident)."""
        ...

    def counters(self) -> tuple[int | None, int | None]:
        """(adapter loads, evictions) so far; None where unknown."""
        ...


@dataclass
class StoreAdapters:
    """Ours: the engine finds adapters in its store and loads them on first use."""

    engine: Engine
    events: Counter[str] = field(default_factory=Counter)  # the engine's adapter events by kind, so far

    async def acquire(self, name: str) -> float:
        return await self.engine.ensure_adapter(name)

    def counters(self) -> tuple[int | None, int | None]:
        """The engine's own count of loads (into host memory) and evictions (out of it)."""
        self.events.update(event.kind for event in self.engine.adapter_events())
        return self.events["load"], self.events["evict"]


@dataclass
class LruAdapters:
    """Before: the server's policy over an engine that needs explicit loads, as Ray Serve 2.60's
    multiplexer (`serve.multiplexed(max_num_models_per_replica=8)`, ray/serve/multiplex.py) ran it
    in deployments/llm.py at 8ede813:

    - a resident adapter is marked most recently used and used at once;
    - otherwise the request takes the one load lock (one load at a time, replica-wide); if its
      adapter became resident meanwhile it goes on (without a recency mark, as Serve does);
      else, with `capacity` adapters resident, the least recently used is evicted first:
      `engine.unload_adapter` refuses new rows for it and waits for its rows to finish, then
      frees it; then `engine.load_adapter` loads the new one (generation pauses for the load).
    """

    engine: Engine
    store: Path
    capacity: int = 8
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loads: int = 0
    evictions: int = 0

    async def acquire(self, name: str) -> float:
        if name in self.resident:
            self.resident.move_to_end(name)
            return 0.0
        start = time.perf_counter()
        async with self.lock:
            if name not in self.resident:
                if len(self.resident) >= self.capacity:
                    victim, _ = self.resident.popitem(last=False)
                    self.evictions += 1
                    await self.engine.unload_adapter(victim)
                await self.engine.load_adapter(name, str(self.store / name))
                self.loads += 1
                self.resident[name] = None
        return time.perf_counter() - start

    def counters(self) -> tuple[int | None, int | None]:
        return self.loads, self.evictions


@dataclass
class EngineSystem:
    """Ours or before: an engine in this process and its adapter policy."""

    engine: Engine
    adapters: AdapterPolicy

    async def warm_up(self, prompt: list[int]) -> None:
        """A few short base-model requests, so lazy initialization is not measured."""
        streams = [self.engine.submit(GenerationRequest(list(prompt), greedy(WARMUP_TOKENS)))
                   for _ in range(WARMUP_REQUESTS)]
        for stream in streams:
            async for _ in stream:
                pass

    async def warm(self, adapter: str) -> None:
        await self.adapters.acquire(adapter)

    async def serve(self, request: TraceRequest, prompt: list[int], outcome: Outcome, clock: Clock) -> None:
        """Acquire the adapter, submit, read the stream; a failed row's error goes into the outcome."""
        outcome.load_wait = await self.adapters.acquire(request.adapter)
        outcome.started = clock()
        stream = self.engine.submit(GenerationRequest(prompt, greedy(request.output_tokens), adapter=request.adapter))
        async with aclosing(stream):  # a cancelled request (cutoff) cancels its row
            async for item in stream:
                now = clock()
                if not is_request_end(item):  # a delta
                    if item.token_ids and outcome.first_token is None:
                        outcome.first_token = now
                    outcome.tokens += len(item.token_ids)
                if ends_stream(item):
                    if failed(item):
                        outcome.error = item.error or "cancelled"
                    else:
                        outcome.finished = now

    async def cut(self) -> None:
        """Nothing to wait for: cancelling a request's task closes its stream, which cancels its row."""

    def adapter_counters(self) -> tuple[int | None, int | None]:
        return self.adapters.counters()

    def steps(self) -> EngineSteps:
        stats = self.engine.stats()
        return EngineSteps(stats.steps, stats.step_seconds, stats.step_rows)

    async def close(self) -> None:
        await self.engine.close()


def is_request_end(item: Any) -> bool:
    return RequestEnd is not None and isinstance(item, RequestEnd)


def ends_stream(item: Any) -> bool:
    """The item ends its request's stream: a RequestEnd, or in engines before it a last delta."""
    return is_request_end(item) or (RequestEnd is None and item.finish_reason is not None)


def failed(item: Any) -> bool:
    """An ending item says its request failed (an error or a cancellation)."""
    return item.failed if is_request_end(item) else item.finish_reason in ("error", "cancelled")


def open_engine_system(job: Job) -> EngineSystem:
    """Load the model into an engine (blocking) with the job's adapter policy: a store (ours) or
    Serve's LRU over explicit loads (before)."""
    if job.system == "ours":
        config = EngineConfig(model=job.model, max_batch_size=job.max_batch_size, adapter_stores=[job.store])
        engine = Engine.from_config(config)
        return EngineSystem(engine, StoreAdapters(engine))
    engine = Engine.from_config(EngineConfig(model=job.model, max_batch_size=job.max_batch_size))
    return EngineSystem(engine, LruAdapters(engine, Path(job.store), job.lru_adapters))
