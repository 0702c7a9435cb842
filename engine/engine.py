"""The engine's async shell: submit requests, stream their deltas, run the core's steps.

Layers (each module's docstring says more):

    Engine (this file, the caller's event loop)   submit / cancel / stream / adapters / stats
      EngineCore (engine/core.py, worker thread)  step() = schedule -> run -> postprocess
        Scheduler (scheduler.py)                  waiting/running rows, chunked prefill, preemption
        BlockManager (blocks.py)                  blocks, reference counts, prefix keys, LRU
        ModelRunner (runner.py)                   packed forward, LoRA gathered per token (lora.py)
        Postprocessor (postprocess.py)            sampling, logprobs, token bookkeeping, finished rows
      AdapterManager (adapters.py)                adapter tiers: pool on the device, host LRU, stores
        PagedKVCache (kv_cache.py)                KV tensors written in place, paged attention

Contract:
- A request's limits (max_tokens_cap, logit_bias ids within the model's vocabulary, prompt
  plus max_tokens within the context window and the KV cache, n choices) are checked once, by
  `check_limits`: in `chat_request` / `completion_request`, which return a CheckedRequest, or
  else in `submit`. `submit` checks every time that the request can be queued now (engine
  alive, adapter loaded, id free, queue not full: `_check_can_queue`), raising
  InvalidRequestError and subclasses, EngineDeadError, or EngineOverloadedError when too many
  wait. "Admitted" is the scheduler's word alone: a queued row is admitted when it gets its
  blocks and starts running (engine/scheduler.py).
- `submit` returns an async iterator of a request's Deltas, then one RequestEnd, its last item
  (engine/request.py: each choice's finish reason, the stats with the usage, the error, and
  `failed`; the one word on how the request ended, engine/choices.py `OpenRequest`). A
  choice's last delta has its `finish_reason` (stop, length, cancelled, error) and `stats`.
  Deltas that pile up while the consumer is busy are merged into one; `pace` spaces them further.
  A request with `params.n > 1` runs one row per choice (the forks share its prompt's
  blocks, engine/row.py); its stream interleaves the choices' deltas (`Delta.index`), each
  choice ends with its own last delta, and the RequestEnd follows the n-th (what piles up is
  merged per choice; `pace` is not applied to it). A choice that fails fails its request: the
  other choices are cancelled and the stream's next item is the RequestEnd. Closing the
  stream (or `cancel`) cancels every choice.
- Adapters: `submit` takes requests for adapters resident in host memory (`check`); a direct
  user makes one resident with `ensure_adapter` (from the stores, on a loader thread; concurrent
  callers share one load) or `load_adapter` (from a folder, pinned until `unload_adapter`). A
  request holds its adapter from submit to its end, so no tier evicts it meanwhile.
- Threads: the core runs on one worker thread, one step at a time; the event loop awaits each
  step, so the two never touch the core at once. Between steps the loop only hands rows to
  the core (`EngineCore.add`, a thread-safe deque) and sets `row.cancelled`; it owns the
  output queues (`_queues`) and dispatches each step's events into them. Adapter loads and
  unloads change only the manager's tables (engine/adapters.py); the pool copies happen on the
  worker at the start of a step. Every torch call of the engine, the model load included, runs
  on that one worker thread (why: bench/README.md, Design notes).
- An error in one request fails that request only; an error in a shared forward pass fails
  the rows of that pass; the loop goes on. `alive` is False once the loop itself has died.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from engine.config import EngineConfig, SamplingParams
from engine.choices import OpenRequest, check_choices, choice_stream
from engine.constraints import GrammarCache
from engine.core import EngineCore, EngineStats, Event
from engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, PromptTooLongError
from engine.attention import check_supported
from engine.loader import LoadedModel, load_model
from engine.adapter_report import AdapterEvent, AdapterReport
from engine.adapter_store import StoreSet, open_stores
from engine.adapters import AdapterManager, TierLimits
from engine.lora import LoraLayers
from engine.prompt import ChatMessage, Instruction, PromptBuilder, Tools
from engine.request import CheckedRequest, Delta, GenerationRequest, RequestEnd, RequestOutput
from engine.row import Row

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "Pace"]

Pace = Callable[[], float]
"""Least seconds until a stream's next delta (see `Engine.submit`)."""


class Engine:
    """Continuous batching over one model and its LoRA adapters. Create and use on one event loop."""

    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, worker: Executor | None = None,
        stores: StoreSet | None = None,
    ):
        """`worker`: the one thread that does all of this engine's torch work (see `from_config`);
        `stores`: where adapters are found by name (engine/adapter_store.py)."""
        check_supported(loaded.model.config, loaded.context_window)
        self.config = config
        self.loaded = loaded
        self._worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.lora = self._worker.submit(
            LoraLayers, loaded.model, int(config.adapter_device_memory), config.max_active_adapters,
            prepack=uses_packed_weights(loaded, config), kernel=config.lora_kernel,
        ).result()
        self.adapters = AdapterManager(
            self.lora, TierLimits(int(config.adapter_host_memory), config.adapter_load_timeout_s),
            loaded.dtype, loaded.device, fetch=stores.fetch if stores is not None else None,
        )
        self.stores = stores
        self.prompts = PromptBuilder(
            loaded.tokenizer, config.prompt_template, loaded.context_window, config.max_input_tokens
        )
        self.core = self._worker.submit(EngineCore, loaded, config, self.adapters).result()
        self.grammars = GrammarCache(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
        self._open: dict[str, OpenRequest] = {}  # submitted requests until their end, by id
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    def from_config(
        cls, config: EngineConfig, worker: Executor | None = None, preload: Iterable[str] | None = None,
    ) -> Engine:
        """Load the model, and into host memory the adapters `preload` names (default: every one
        of `config.adapters`) and the pinned ones (blocking; seconds to minutes).

        Everything runs on the engine's own worker thread, which later runs every step: once
        more threads than CPUs have run OpenMP regions, libgomp stops spin-waiting and every op
        waits for a sleeping thread to wake (bench/README.md, Design notes). `worker` replaces
        that thread (a benchmark that steps the core on its own thread)."""
        worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        engine = cls(worker.submit(load_model, config).result(), config, worker, stores=open_stores(config))
        for name, source in config.adapters.items():
            engine.adapters.register(name, source)
        preload = config.adapters if preload is None else preload
        for name in dict.fromkeys([*preload, *config.pinned_adapters]):
            engine.adapters.preload(name, pinned=name in config.pinned_adapters)
        return engine

    # ----- public API -------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    @property
    def running(self) -> int:
        """Rows holding KV blocks now (decoding or being prefilled)."""
        return self.core.num_running

    def chat_request(
        self, messages: Sequence[ChatMessage], params: SamplingParams, adapter: str | None = None,
        tools: Tools = (),
    ) -> CheckedRequest:
        """A request for a chat reply offering `tools`, with the history trimmed to the context
        budget; its limits checked (max_tokens first: too many is a 400, not a prompt too long)."""
        self._check_params(params)
        prompt = self.prompts.chat(messages, params.max_tokens, tools)
        return self._checked(CheckedRequest(
            prompt.token_ids, params, adapter, extra_stop=prompt.stop, dropped_messages=prompt.dropped_messages,
        ))

    def completion_request(
        self, prompt: str | list[int] | Instruction, params: SamplingParams, adapter: str | None = None
    ) -> CheckedRequest:
        """A request for a raw prompt, or for the seed API's instruction (its text stays text);
        its limits checked."""
        self._check_params(params)
        ids = self.prompts.completion(prompt, params.max_tokens).token_ids
        return self._checked(CheckedRequest(ids, params, adapter))

    def check_limits(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError (PromptTooLongError for the context) unless the request
        fits: max_tokens at most max_tokens_cap, logit_bias ids in the vocabulary, prompt plus max_tokens within the context
        window and the KV cache, n choices within the batch and the cache."""
        self._check_params(request.params)
        self._check_fit(request)

    def submit(self, request: GenerationRequest, pace: Pace | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request now; iterate the result to read its deltas and then its RequestEnd
        (closing it earlier cancels).

        `pace()`: the stream's deltas go out at most once per `pace()` seconds, on a clock
        shared by all streams (asked after each delta; default: no pause). Deltas up to the first
        with text, and the last (with `finish_reason`), are never held back; what arrives meanwhile
        is merged.
        Fewer, larger deltas cost a transport with a per-message price (Ray's handles) less CPU.
        A request not made by `chat_request` / `completion_request` has its limits checked here."""
        if not isinstance(request, CheckedRequest):
            self.check_limits(request)
        self._check_can_queue(request)
        self._ensure_started()
        rows = self.new_rows(request)
        self.adapters.acquire(request.adapter)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._open[request.request_id] = OpenRequest(queue, rows, request.adapter)
        for row in rows:
            self.core.add(row)
        self._wakeup.set()
        if len(rows) > 1:
            return choice_stream(queue, lambda: self.cancel(request.request_id))
        return self._stream(request.request_id, queue, pace or _no_pause)

    def new_row(self, request: GenerationRequest, choice: int = 0, parent: Row | None = None) -> Row:
        """The engine-side state of a (validated) request, for `submit` or for `core.add`."""
        return Row.create(
            request, self.loaded.tokenizer, self.loaded.eos_token_ids,
            self.config.max_consecutive_newlines, self.loaded.device, self.config.request_timeout_s,
            adapter_identity=self.adapters.identity(request.adapter),
            repetition=self.config.repetition_guard, choice=choice, parent=parent,
            constraint=self.grammars.constraint(request.params.grammar) if request.params.grammar else None,
        )

    def new_rows(self, request: GenerationRequest) -> list[Row]:
        """One row per choice: choice 0's, then its forks (they share its prompt blocks)."""
        first = self.new_row(request)
        return [first] + [self.new_row(request, i, first) for i in range(1, request.params.n)]

    def submit_group(
        self, requests: Sequence[GenerationRequest], pace: Pace | None = None
    ) -> list[AsyncIterator[RequestOutput] | Exception]:
        """Queue several requests at once so they are admitted and prefilled together.

        A request that fails validation gets its exception in its place; the others go on.
        """
        streams: list[AsyncIterator[RequestOutput] | Exception] = []
        for request in requests:
            try:
                streams.append(self.submit(request, pace))
            except (InvalidRequestError, EngineOverloadedError, EngineDeadError) as err:
                streams.append(err)
        return streams

    def cancel(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step. Unknown ids are ignored."""
        request = self._open.get(request_id)
        for row in request.rows if request else ():
            if not row.cancelled and not row.finished:
                row.cancelled = True
                self._wakeup.set()

    async def ensure_adapter(self, name: str, source: str | None = None) -> float:
        """Make adapter `name` resident (from `source`, a folder or hub id, else the stores) while
        serving; return the seconds waited for its load (0 when it was resident). Steps go on
        meanwhile. Raises AdapterNotFoundError, InvalidRequestError, AdapterTimeoutError."""
        return await self.adapters.ensure(name, source)

    @asynccontextmanager
    async def holding_adapter(self, name: str | None, source: str | None = None) -> AsyncIterator[float]:
        """`ensure_adapter`, keeping the adapter resident until the block ends: for callers that
        await something between the load and `submit` (None: the base model, nothing to do)."""
        if name is None:
            yield 0.0
            return
        waited = await self.adapters.ensure(name, source, hold=True)
        try:
            yield waited
        finally:
            self.adapters.release(name)

    async def load_adapter(self, name: str, source: str) -> None:
        """Load a LoRA adapter from a folder or hub id while serving, pinned in host memory until
        `unload_adapter` (loading the same name from the same source again is a no-op)."""
        await self.adapters.ensure(name, source)
        self.adapters.pin(name)

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name`, wait for its rows to finish, then free its weights."""
        self._wakeup.set()
        await self.adapters.unload(name)

    def adapter_report(self) -> AdapterReport:
        """Which adapters are resident in which tier, and the tiers' budgets."""
        return self.adapters.report()

    def adapter_events(self) -> list[AdapterEvent]:
        """Adapter loads, evictions, (de)activations since the last call."""
        return self.adapters.drain_events()

    def stats(self) -> EngineStats:
        """A snapshot; read between steps, so consistent up to the step that may be running."""
        return self.core.stats(tracked_requests=len(self._open))

    async def close(self) -> None:
        """Stop the loop and cancel every request."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._worker.shutdown, True)  # a step still running ends first
        self.adapters.close()
        self._dispatch(self.core.abort_all("the engine was shut down"))

    # ----- validation and streaming -----------------------------------------------------

    def _checked(self, request: CheckedRequest) -> CheckedRequest:
        self._check_fit(request)
        return request

    def _check_can_queue(self, request: GenerationRequest) -> None:
        """Raise unless `request` may join the queue now (what may change between requests): the
        engine alive, the adapter resident (and not being unloaded: `acquire` checks that), the
        id free, room in the queue. For the server the adapter is an invariant: its replica
        ensures the adapter before it submits (deployments/), so only direct engine users
        (tests, benchmarks) meet UnknownAdapterError."""
        if not self.alive:
            raise EngineDeadError("the engine loop has stopped")
        self.adapters.check(request.adapter)
        if request.request_id in self._open:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if self.core.num_waiting >= self.config.max_waiting:
            raise EngineOverloadedError(f"{self.core.num_waiting} requests are already waiting")

    def _check_params(self, params: SamplingParams) -> None:
        """What the request's settings may ask of this model: max_tokens within the cap, and
        logit_bias ids that the model's logits have (the sampler indexes them)."""
        cap = self.config.max_tokens_cap
        if params.max_tokens > cap:
            raise InvalidRequestError(f"max_tokens is {params.max_tokens}; at most {cap} allowed")
        vocab = self.loaded.model.config.vocab_size
        if outside := sorted(t for t in params.logit_bias if t >= vocab):
            named = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
            raise InvalidRequestError(
                f"logit_bias: token id {named} is not in the model's vocabulary (ids 0 to {vocab - 1})"
            )

    def _check_fit(self, request: GenerationRequest) -> None:
        """The prompt plus max_tokens within the context window and the KV cache; n choices too."""
        total = len(request.prompt_ids) + request.params.max_tokens
        limit = min(self.loaded.context_window, self.core.capacity_tokens)
        if not request.prompt_ids or total > limit:
            raise PromptTooLongError(
                f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                f"({request.params.max_tokens}) must be between 1 and {limit} tokens"
            )
        check_choices(request, self.config.max_batch_size, self.core.capacity_tokens)

    async def _stream(self, request_id: str, queue: asyncio.Queue[RequestOutput],
                      pace: Pace) -> AsyncIterator[RequestOutput]:
        """A one-choice request's items, paced (see `submit`); the RequestEnd ends it."""
        loop = asyncio.get_running_loop()
        hold_until = 0.0  # the next delta waits until then for more to merge (not a last one)
        shown = False  # a delta with text went out: pacing starts there, never before the first text
        try:
            while True:
                item = await queue.get()
                if isinstance(item, RequestEnd):
                    yield item
                    return
                delta = _drain(queue, item)
                if not delta.finish_reason and loop.time() < hold_until:
                    try:  # one timer per message, not one per delta merged into it
                        async with asyncio.timeout_at(hold_until):
                            while not delta.finish_reason:
                                delta = _drain(queue, delta.merge(await queue.get()))
                    except TimeoutError:
                        pass
                yield delta
                if delta.finish_reason:
                    continue  # the RequestEnd is queued behind it
                shown = shown or bool(delta.text)
                hold_until = _next_tick(loop.time(), pace()) if shown else 0.0
        finally:
            self.cancel(request_id)

    # ----- the loop ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def _loop(self) -> None:
        try:
            while True:
                if not self.core.has_work():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                events = await self._run_on_worker(self.core.step)
                self._dispatch(events)
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            log.exception("engine loop died")
            self._dispatch(self.core.abort_all(f"engine failure: {err}"))
            raise

    async def _run_on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _dispatch(self, events: list[Event]) -> None:
        """Each delta to its request (`OpenRequest.deliver`); an ended request lets go of its
        adapter, and a failed choice has its request's other choices cancelled."""
        for request_id, delta in events:
            request = self._open.get(request_id)
            if request is None:
                continue
            if request.deliver(delta) is not None:
                del self._open[request_id]
                self.adapters.release(request.adapter)
            elif delta.failed:
                self.cancel(request_id)


def _no_pause() -> float:
    return 0.0


def _next_tick(now: float, pause: float) -> float:
    """The end of the current `pause`-long period of the event loop's clock: streams paced
    alike send together, in one burst per period, instead of spreading their messages (and
    the CPU each costs) over the whole period."""
    return (now // pause + 1) * pause if pause > 0 else now


def _drain(queue: asyncio.Queue[RequestOutput], delta: Delta) -> Delta:
    """`delta` merged with every delta already queued after it, up to a last one (the
    RequestEnd comes only after that)."""
    while not delta.finish_reason and not queue.empty():
        delta = delta.merge(queue.get_nowait())
    return delta


def uses_packed_weights(loaded: LoadedModel, config: EngineConfig) -> bool:
    """Prepacked oneDNN weights: on the CPU in bf16/fp16 only (in fp32 oneDNN rounds unlike
    `F.linear`, and the exactness tests run in fp32)."""
    return (
        config.prepack_weights and loaded.device.type == "cpu" and loaded.dtype in (torch.bfloat16, torch.float16)
        and torch.backends.mkldnn.is_available()
    )
