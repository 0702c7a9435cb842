"""The synchronous engine: requests in, one step at a time, deltas out.

One `step()` picks up arrivals and cancels, then makes three moves, as in nano-vllm:

    chunks = self._schedule()              # which tokens to compute (engine/scheduler.py)
    out = self.runner.run(chunks)          # one packed forward over the KV cache (engine/runner.py)
    events += self.post.process(chunks, out)  # advance rows, key blocks, sample, retire (engine/postprocess.py)

On a CPU with `spare_core_rows` set, a small decode-only step runs on one torch thread fewer
(engine/step_threads.py), set just before its forward pass.

The KV cache sizes itself (`PagedKVCache.for_engine`, engine/kv_cache.py); prefix keys are the
block manager's (engine/blocks.py).

Who owns what: the core, its scheduler, block manager, KV cache, runner and postprocessor
belong to the thread that calls `step()` (the async shell's worker thread, or a test). Other
threads may only call `add` (a thread-safe deque append) and set `row.cancelled`; both are
picked up at the start of the next step. `step()` returns `(request id, Delta)` events; a
row's last delta has its finish reason, and by then its blocks are given back (the async
shell turns a request's last rows into its RequestEnd, engine/choices.py).

Errors: a row whose logits are not finite, or whose detokenizing fails, finishes with an
error alone (engine/postprocess.py). An exception in the forward pass fails the rows of that
pass; the core goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.attention_kernel import kernel_for as attention_kernel_for
from engine.blocks import BlockManager
from engine.config import EngineConfig
from engine.kv_cache import PagedKVCache, attention_shape
from engine.loader import LoadedModel
from engine.adapters import AdapterManager
from engine.postprocess import Event, Postprocessor
from engine.row import Row
from engine.runner import ModelRunner
from engine.scheduler import ScheduledChunk, Scheduler
from engine.step_threads import StepThreads

log = logging.getLogger(__name__)

__all__ = ["EngineCore", "EngineStats", "Event", "StepCounters"]


@dataclass
class EngineStats:
    running: int
    waiting: int
    batch_size: int  # rows computed in the last step
    kv_tokens: int  # token slots held by rows (blocks x block size)
    kv_blocks_total: int
    kv_blocks_used: int  # held by running rows
    kv_blocks_cached: int  # unreferenced, holding a reusable prefix
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found cached (not recomputed)
    preemptions: int
    finished_requests: int
    generated_tokens: int
    tracked_requests: int  # waiting + running + finished-but-unread: 0 when idle, or something leaks
    steps: int = 0  # steps that computed something, since start
    step_seconds: float = 0.0  # time those steps took (forward pass, sampling, bookkeeping)
    step_rows: int = 0  # rows computed, summed over those steps (mean batch = step_rows / steps)
    step_tokens: int = 0  # tokens computed (prompt chunks and decodes), summed over those steps


@dataclass
class StepCounters:
    """Where the worker's time goes: totals since start, read by stats() and benchmarks."""

    steps: int = 0
    seconds: float = 0.0
    rows: int = 0
    tokens: int = 0

    def add(self, seconds: float, chunks: list[ScheduledChunk]) -> None:
        self.steps += 1
        self.seconds += seconds
        self.rows += len(chunks)
        self.tokens += sum(c.length for c in chunks)


class EngineCore:
    """Scheduler + block manager + KV cache + model runner + postprocessor, driven by `step()`."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, adapters: AdapterManager):
        self.config = config
        self.block_size = config.kv_block_size
        self.cache = PagedKVCache.for_engine(loaded.model.config, loaded.dtype, loaded.device, config)
        self.blocks = BlockManager(self.cache.num_blocks, self.block_size, config.enable_prefix_caching)
        self.adapters = adapters
        self.scheduler = Scheduler(
            self.blocks, config.max_batch_size, config.max_step_tokens, fair_share=config.fair_share,
            can_admit=lambda row: adapters.is_active(row.request.adapter, row.adapter_identity),
        )
        self.runner = ModelRunner(
            loaded.model, self.cache, adapters.layers, adapters.placements,
            attention_kernel_for(config.attention_kernel, loaded.device, loaded.dtype,
                                 attention_shape(loaded.model.config)[1]),
        )
        self.post = Postprocessor(self.scheduler, loaded.tokenizer)
        self.threads = StepThreads.for_device(loaded.device, config.spare_core_rows)
        self._incoming: deque[Row] = deque()
        self._last_rows = 0
        self.counters = StepCounters()
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB)",
                 self.cache.num_blocks, self.block_size, self.cache.nbytes / 2**20)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.block_size

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._incoming)

    def add(self, row: Row) -> None:
        """Queue a row; it joins at the next step (safe from any thread)."""
        self._incoming.append(row)

    def has_work(self) -> bool:
        return bool(self._incoming or self.scheduler.waiting or self.scheduler.running)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Run one step; return its events (possibly none)."""
        start = time.perf_counter()
        events = self._take_incoming()  # arrivals join the waiting rows; cancelled rows finish
        chunks = self._schedule()  # 1. schedule: which tokens of which rows
        if not chunks:
            return events
        if self.threads is not None:
            self.threads.apply(chunks)
        try:
            out = self.runner.run(chunks)  # 2. run: one packed forward pass
        except Exception as err:  # a failed pass fails its rows; the core goes on
            log.exception("forward pass failed for %d rows", len(chunks))
            events += self.post.finish([c.row for c in chunks], "error", f"forward pass failed: {err}")
        else:
            events += self.post.process(chunks, out)  # 3. postprocess: sample, advance, retire
        self.counters.add(time.perf_counter() - start, chunks)
        return events

    def abort_all(self, message: str) -> list[Event]:
        """Fail every request (the engine is shutting down or broke)."""
        self._take_incoming()
        return self.post.finish([*self.scheduler.waiting, *self.scheduler.running], "error", message)

    def stats(self, tracked_requests: int) -> EngineStats:
        blocks = self.blocks.stats()
        prefix = self.scheduler.stats
        return EngineStats(
            running=self.num_running,
            waiting=self.num_waiting,
            batch_size=self._last_rows,
            kv_tokens=blocks.held * self.block_size,
            kv_blocks_total=blocks.total,
            kv_blocks_used=blocks.held,
            kv_blocks_cached=blocks.cached,
            prefix_cache_queries=prefix.queried_tokens,
            prefix_cache_hits=prefix.hit_tokens,
            preemptions=prefix.preemptions,
            finished_requests=self.post.finished_requests,
            generated_tokens=self.post.generated_tokens,
            tracked_requests=tracked_requests,
            steps=self.counters.steps,
            step_seconds=self.counters.seconds,
            step_rows=self.counters.rows,
            step_tokens=self.counters.tokens,
        )

    # ----- inside a step ---------------------------------------------------------------

    def _take_incoming(self) -> list[Event]:
        """Move new rows to the waiting queue; finish cancelled rows."""
        while self._incoming:
            self.scheduler.waiting.append(self._incoming.popleft())
        cancelled = [r for r in (*self.scheduler.waiting, *self.scheduler.running) if r.cancelled]
        return self.post.finish(cancelled, "cancelled")

    def _schedule(self) -> list[ScheduledChunk]:
        """The step's chunks, once the adapters of the rows that may be admitted are on the device."""
        self._bring_adapters()
        chunks = self.scheduler.schedule()
        self._last_rows = len(chunks)
        return chunks

    def _bring_adapters(self) -> None:
        """Copy the adapters of the rows that may be admitted this step into the device pool."""
        scheduler = self.scheduler
        room = scheduler.max_rows - len(scheduler.running)
        if room <= 0 or not scheduler.waiting:
            return
        waiting = [row.request.adapter for row in scheduler.admission_order()[:room]]
        if any(waiting):
            self.adapters.prepare_step((row.request.adapter for row in scheduler.running), waiting)
