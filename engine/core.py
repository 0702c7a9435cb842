"""The synchronous engine: requests in, one step at a time, deltas out.

One `step()` is three moves, as in nano-vllm:

    chunks = scheduler.schedule()          # which tokens to compute (engine/scheduler.py)
    out = runner.run(chunks)               # one packed forward over the KV cache (engine/runner.py)
    events = self._postprocess(...)        # register full blocks, score prompts, sample, advance, retire

Logprobs (engine/logprobs.py) come from the same logits: a prompt's from the positions the
runner kept for it, a sampled token's from its row's logits before the sampler changes them.

Who owns what: the core, its scheduler, block manager, KV cache and runner belong to the
thread that calls `step()` (the async shell's worker thread, or a test). Other threads may
only call `add` (a thread-safe deque append) and set `row.cancelled`; both are picked up at
the start of the next step. `step()` returns `(request id, Delta)` events; a request's last
delta has its finish reason, and by then its blocks are given back.

Errors: a row whose logits are not finite, or whose detokenizing fails, finishes with an
error alone. An exception in the forward pass fails the rows of that pass; the core goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.blocks import BlockManager
from engine.config import EngineConfig
from engine.kv_cache import PagedKVCache
from engine.loader import LoadedModel
from engine.logprobs import LogprobMaker, TokenLogprob
from engine.adapters import AdapterManager
from engine.request import Delta
from engine.row import Row
from engine.runner import ModelRunner, StepLogits
from engine.sampling import sample_next_tokens
from engine.scheduler import ScheduledChunk, Scheduler

log = logging.getLogger(__name__)

Event = tuple[str, Delta]


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
    """Scheduler + block manager + KV cache + model runner, driven by `step()`."""

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
        self.runner = ModelRunner(loaded.model, self.cache, adapters.layers, adapters.placements)
        self.logprobs = LogprobMaker(loaded.tokenizer)
        self._incoming: deque[Row] = deque()
        self._last_rows = 0
        self.counters = StepCounters()
        self.finished_requests = 0
        self.generated_tokens = 0
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

    def step(self) -> list[Event]:
        """Run one step; return its events (possibly none)."""
        with torch.inference_mode():
            return self._step()

    def _step(self) -> list[Event]:
        start = time.perf_counter()
        events = self._take_incoming()
        self._bring_adapters()
        chunks = self.scheduler.schedule()
        self._last_rows = len(chunks)
        if not chunks:
            return events
        events += self._compute(chunks)
        self.counters.add(time.perf_counter() - start, chunks)
        return events

    def _compute(self, chunks: list[ScheduledChunk]) -> list[Event]:
        """The forward pass over the chunks, then sampling; a failed pass fails its rows."""
        try:
            out = self.runner.run(chunks)
        except Exception as err:
            log.exception("forward pass failed for %d rows", len(chunks))
            return [self._finish(c.row, "error", error=f"forward pass failed: {err}") for c in chunks]
        for chunk in chunks:
            self._computed(chunk)
        if out.prompt_spans:
            self._score_prompts(out)
        return self._sample(out.rows, out.logits)

    def abort_all(self, message: str) -> list[Event]:
        """Fail every request (the engine is shutting down or broke)."""
        self._take_incoming()
        rows = list(self.scheduler.waiting) + self.scheduler.running
        return [self._finish(row, "error", error=message) for row in rows]

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
            finished_requests=self.finished_requests,
            generated_tokens=self.generated_tokens,
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
        return [self._finish(row, "cancelled") for row in cancelled]

    def _bring_adapters(self) -> None:
        """Copy the adapters of the rows that may be admitted this step into the device pool."""
        scheduler = self.scheduler
        room = scheduler.max_rows - len(scheduler.running)
        if room <= 0 or not scheduler.waiting:
            return
        waiting = [row.request.adapter for row in scheduler.admission_order()[:room]]
        if any(waiting):
            self.adapters.prepare_step((row.request.adapter for row in scheduler.running), waiting)

    def _computed(self, chunk: ScheduledChunk) -> None:
        """Advance the row past the chunk and key the blocks it filled for the prefix cache."""
        chunk.row.num_computed = chunk.start + chunk.length
        self.blocks.register_computed(chunk.row)

    def _score_prompts(self, out: StepLogits) -> None:
        """Append the logprobs of the prompt tokens this step scored to their rows."""
        first = 0
        for span in out.prompt_spans:
            row = span.row
            prompt = row.request.prompt_ids
            chosen = prompt[span.first + 1 : span.first + 1 + span.count]
            logits = out.prompt_logits[first : first + span.count]
            top = [row.request.params.prompt_logprobs] * span.count
            row.prompt_logprobs += self.logprobs.entries(logits, chosen, top)
            first += span.count

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[Event]:
        """Each sampling row's next token, turned into its delta; a row's error is its own."""
        if not rows:
            return []
        scoring = [i for i, row in enumerate(rows) if row.request.params.logprobs is not None]
        scored = logits[scoring].float() if scoring else None  # a copy: the sampler changes `logits`
        tokens = sample_next_tokens(logits, [r.sampler for r in rows])
        logprobs = self._token_logprobs(rows, scoring, scored, tokens) if scoring else {}
        events = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            try:
                if token is None:
                    raise ValueError("the model produced non-finite logits (NaN or inf) for this request")
                delta = row.advance(token)
                if i in logprobs and delta.token_ids:
                    delta.logprobs = [logprobs[i]]
                if len(row.sampler.output_ids) == 1:
                    self._attach_prompt(row, delta)
            except Exception as err:
                log.warning("request %s failed: %s", row.request_id, err)
                events.append(self._finish(row, "error", error=str(err)))
                continue
            self.generated_tokens += len(delta.token_ids)
            if delta.finish_reason:
                self._retire(row)
            events.append((row.request_id, delta))
        return events

    def _token_logprobs(self, rows: list[Row], scoring: list[int], logits: torch.Tensor,
                        tokens: list[int | None]) -> dict[int, TokenLogprob]:
        """Logprobs of the sampled tokens of rows `scoring` (indexes into `rows`), by index."""
        kept = [(j, i) for j, i in enumerate(scoring) if tokens[i] is not None]
        if not kept:
            return {}
        entries = self.logprobs.entries(
            logits[[j for j, _ in kept]], [tokens[i] for _, i in kept], [rows[i].request.params.logprobs for _, i in kept]
        )
        return {i: entry for (_, i), entry in zip(kept, entries)}

    def _attach_prompt(self, row: Row, delta: Delta) -> None:
        """A choice's first delta carries its prompt's text and logprobs, when asked."""
        params = row.request.params
        if params.echo:
            delta.prompt_text = self.logprobs.text(row.request.prompt_ids)
        if row.prompt_logprobs is not None:  # the first token has no logprob (nothing before it)
            first = row.request.prompt_ids[0]
            delta.prompt_logprobs = [TokenLogprob(first, self.logprobs.token(first), None)] + row.prompt_logprobs[1:]

    def _finish(self, row: Row, reason: str, error: str | None = None) -> Event:
        delta = row.finish(reason, error=error)
        self._retire(row)
        return row.request_id, delta

    def _retire(self, row: Row) -> None:
        self.scheduler.remove(row)
        self.finished_requests += 1

