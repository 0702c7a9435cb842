"""The engine loop: admit -> prefill -> join -> decode -> emit -> retire, one step at a time.

Contract:
- `submit(request)` validates at once (raising InvalidRequestError and subclasses, or
  EngineOverloadedError when too many wait) and returns an async iterator of Deltas; the
  last delta has `finish_reason` (stop, length, cancelled, error) and `stats`. Deltas that
  pile up while the consumer is busy are merged into one.
- Every running request shares one forward pass per decode step; between steps waiting
  requests are admitted (up to `max_batch_size` rows and `max_kv_tokens` reserved tokens),
  prefilled together and joined to the running batch; finished or cancelled rows leave.
- Model work runs on one worker thread, never on the caller's event loop. All bookkeeping
  runs on the loop between steps, so nothing needs a lock but the adapter operations.
- An error in one request fails that request only; an error in a shared forward pass fails
  the rows of that pass; the loop goes on. `alive` is False once the loop itself has died.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.adapters import AdapterRegistry
from engine.batch import KVBatch, prefill_inputs
from engine.config import EngineConfig, SamplingParams
from engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, PromptTooLongError
from engine.loader import LoadedModel, load_model
from engine.prompt import ChatMessage, PromptBuilder
from engine.request import Delta, GenerationRequest
from engine.row import Row
from engine.sampling import sample_next_tokens

log = logging.getLogger(__name__)

Event = tuple[Row, Delta]


@dataclass
class EngineStats:
    running: int
    waiting: int
    batch_size: int
    kv_tokens: int
    kv_tokens_reserved: int
    finished_requests: int
    generated_tokens: int
    tracked_requests: int  # waiting + running + finished-but-unread: 0 when idle, or something leaks


class Engine:
    """Continuous batching over one model and its LoRA adapters. Create and use on one event loop."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.loaded = loaded
        self.adapters = AdapterRegistry(loaded.model, config.hf_token)
        self.prompts = PromptBuilder(
            loaded.tokenizer, config.prompt_template, loaded.context_window, config.max_input_tokens
        )
        tokenizer = loaded.tokenizer
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._rows: dict[str, Row] = {}
        self._draining: set[str] = set()
        self._batch: KVBatch | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._model_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._finished_requests = 0
        self._generated_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load the model and the adapters the config names (blocking; seconds to minutes)."""
        engine = cls(load_model(config), config)
        for name, source in config.adapters.items():
            engine.adapters.load(name, source)
        return engine

    # ----- public API -------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    @property
    def running(self) -> int:
        """Rows in the running batch now."""
        return len(self._running)

    def chat_request(
        self, messages: Sequence[ChatMessage], params: SamplingParams, adapter: str | None = None
    ) -> GenerationRequest:
        """A request for a chat reply, with the history trimmed to the context budget."""
        self._check_params(params)
        prompt = self.prompts.chat(messages, params.max_tokens)
        return GenerationRequest(
            prompt.token_ids, params, adapter, extra_stop=prompt.stop,
            dropped_messages=prompt.dropped_messages,
        )

    def completion_request(
        self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None
    ) -> GenerationRequest:
        self._check_params(params)
        return GenerationRequest(self.prompts.completion(prompt, params.max_tokens).token_ids, params, adapter)

    def submit(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Queue a request now; iterate the result to read its deltas (closing it cancels)."""
        self._check(request)
        self._ensure_started()
        row = Row.create(
            request, self.loaded.tokenizer, self.loaded.eos_token_ids,
            self.config.max_consecutive_newlines, self.loaded.device, self.config.request_timeout_s,
        )
        self._rows[request.request_id] = row
        self._waiting.append(row)
        self._wakeup.set()
        return self._stream(row)

    def submit_group(self, requests: Sequence[GenerationRequest]) -> list[AsyncIterator[Delta] | Exception]:
        """Queue several requests at once so they are admitted and prefilled together.

        A request that fails validation gets its exception in its place; the others go on.
        """
        streams: list[AsyncIterator[Delta] | Exception] = []
        for request in requests:
            try:
                streams.append(self.submit(request))
            except (InvalidRequestError, EngineOverloadedError, EngineDeadError) as err:
                streams.append(err)
        return streams

    def cancel(self, request_id: str) -> None:
        """Stop a request; its row is freed at the next step boundary. Unknown ids are ignored."""
        row = self._rows.get(request_id)
        if row is None or row.finished:
            return
        row.cancelled = True
        if row in self._waiting:
            self._waiting.remove(row)
            self._dispatch([(row, row.finish("cancelled"))])
        self._wakeup.set()

    async def load_adapter(self, name: str, source: str) -> None:
        """Load a LoRA adapter while serving (generation pauses for the load)."""
        self._ensure_started()
        async with self._model_lock:
            await self._run_on_worker(self.adapters.load, name, source)

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name`, wait for its rows to finish, then free its weights."""
        self.adapters.check(name)
        self._draining.add(name)
        try:
            while any(r.request.adapter == name for r in self._rows.values()):
                await asyncio.sleep(0.01)
            async with self._model_lock:
                await self._run_on_worker(self.adapters.unload, name)
        finally:
            self._draining.discard(name)

    def stats(self) -> EngineStats:
        batch = self._batch
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            batch_size=batch.rows if batch else 0,
            kv_tokens=batch.kv_tokens() if batch else 0,
            kv_tokens_reserved=sum(r.reservation for r in self._running),
            finished_requests=self._finished_requests,
            generated_tokens=self._generated_tokens,
            tracked_requests=len(self._rows),
        )

    async def close(self) -> None:
        """Stop the loop and cancel every request."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all("the engine was shut down")
        self._worker.shutdown(wait=False)

    # ----- validation and streaming -----------------------------------------------------

    def _check(self, request: GenerationRequest) -> None:
        if not self.alive:
            raise EngineDeadError("the engine loop has stopped")
        self._check_params(request.params)
        self.adapters.check(request.adapter)
        if request.adapter in self._draining:
            raise InvalidRequestError(f"adapter {request.adapter!r} is being unloaded")
        total = len(request.prompt_ids) + request.params.max_tokens
        limit = min(self.loaded.context_window, self.config.max_kv_tokens)
        if not request.prompt_ids or total > limit:
            raise PromptTooLongError(
                f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                f"({request.params.max_tokens}) must be between 1 and {limit} tokens"
            )
        if request.request_id in self._rows:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if len(self._waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(f"{len(self._waiting)} requests are already waiting")

    def _check_params(self, params: SamplingParams) -> None:
        cap = self.config.max_tokens_cap
        if params.max_tokens > cap:
            raise InvalidRequestError(f"max_tokens is {params.max_tokens}; at most {cap} allowed")

    async def _stream(self, row: Row) -> AsyncIterator[Delta]:
        try:
            while True:
                delta = await row.queue.get()
                while not delta.finish_reason and not row.queue.empty():
                    delta = delta.merge(row.queue.get_nowait())
                yield delta
                if delta.finish_reason:
                    return
        finally:
            self.cancel(row.request.request_id)

    # ----- the loop (event loop side) ---------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def _loop(self) -> None:
        try:
            while True:
                if not self._running and not self._waiting:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                admitted = self._admit()
                async with self._model_lock:
                    events = await self._run_on_worker(self._step, admitted)
                self._dispatch(events)
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            log.exception("engine loop died")
            self._fail_all(f"engine failure: {err}")
            raise

    async def _run_on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _admit(self) -> list[Row]:
        """Waiting rows to join now, first come first served, within the row and KV budgets."""
        admitted: list[Row] = []
        reserved = sum(r.reservation for r in self._running)
        while self._waiting and len(self._running) + len(admitted) < self.config.max_batch_size:
            row = self._waiting[0]
            if reserved + row.reservation > self.config.max_kv_tokens:
                break
            admitted.append(self._waiting.popleft())
            reserved += row.reservation
        return admitted

    def _dispatch(self, events: list[Event]) -> None:
        for row, delta in events:
            row.queue.put_nowait(delta)
            self._generated_tokens += len(delta.token_ids)
            if delta.finish_reason:
                self._finished_requests += 1
                self._rows.pop(row.request.request_id, None)

    def _fail_all(self, message: str) -> None:
        rows = list(self._waiting) + self._running
        self._waiting.clear()
        self._running, self._batch = [], None
        self._dispatch([(r, r.finish("error", error=message)) for r in rows if not r.finished])

    # ----- one step (worker thread) -----------------------------------------------------

    def _step(self, admitted: list[Row]) -> list[Event]:
        with torch.inference_mode():
            events = self._retire()
            if admitted:
                events += self._prefill(admitted)
            if self._running:
                events += self._decode()
            return events

    def _prefill(self, rows: list[Row]) -> list[Event]:
        """Prefill rows together and join them; if that fails, retry one by one to isolate."""
        try:
            inputs = prefill_inputs([r.request.prompt_ids for r in rows], self._pad_id, self.loaded.device)
            logits = self.adapters.forward([r.request.adapter for r in rows], **inputs).logits[:, -1]
        except Exception as err:
            if len(rows) == 1:
                log.exception("prefill failed for request %s", rows[0].request.request_id)
                return [(rows[0], rows[0].finish("error", error=f"prefill failed: {err}"))]
            return [event for row in rows for event in self._prefill([row])]
        joining = KVBatch.from_prefill(inputs)
        if self._batch is None:
            self._batch = joining
        else:
            self._batch.extend(joining)
        self._running += rows
        return self._emit(rows, logits) + self._retire()

    def _decode(self) -> list[Event]:
        """One forward pass for every running row; a failure here fails those rows."""
        rows = self._running
        try:
            inputs = self._batch.decode_inputs([r.next_id for r in rows])
            logits = self.adapters.forward([r.request.adapter for r in rows], **inputs).logits[:, -1]
        except Exception as err:
            log.exception("decode step failed for %d rows", len(rows))
            self._running, self._batch = [], None
            return [(r, r.finish("error", error=f"decode step failed: {err}")) for r in rows]
        return self._emit(rows, logits) + self._retire()

    def _emit(self, rows: list[Row], logits: torch.Tensor) -> list[Event]:
        """Sample each row's next token and turn it into a delta; a row's error is its own."""
        tokens = sample_next_tokens(logits, [r.sampler for r in rows])
        events = []
        for row, token in zip(rows, tokens):
            try:
                if token is None:
                    raise ValueError("the model produced non-finite logits (NaN or inf) for this request")
                events.append((row, row.advance(token)))
            except Exception as err:
                log.warning("request %s failed: %s", row.request.request_id, err)
                events.append((row, row.finish("error", error=str(err))))
        return events

    def _retire(self) -> list[Event]:
        """Drop finished and cancelled rows from the running batch."""
        events = [(r, r.finish("cancelled")) for r in self._running if r.cancelled and not r.finished]
        keep = [i for i, r in enumerate(self._running) if not r.finished]
        if len(keep) == len(self._running):
            return events
        if keep:
            self._batch.select(keep)
        else:
            self._batch = None
        self._running = [self._running[i] for i in keep]
        return events
