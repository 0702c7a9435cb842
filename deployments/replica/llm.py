"""The LLM deployment: one engine per replica, @serve.batch admission, adapters on demand.

Ray glue only. One request, end to end: the ingress calls `stream(call)` through a streaming
DeploymentHandle; `stream` holds the call's adapter resident until the request is submitted
(`Engine.holding_adapter`; resolved by the ingress or the chat page:
deployments/frontend/served_models.py; a configured one, a runtime one from its folder, or one found
by name in the adapter stores; the engine's tiers keep it, engine/adapters.py); `_prepare` builds
the engine request; `_admit` (`@serve.batch`, admission only) hands the requests that arrived
together to the engine as one group, which it prefills together, and returns each request its own
stream; `stream` then reads that stream and yields each delta back over the handle, and last the
engine's RequestEnd wrapped in a ReplyEnd with this replica's name (deployments/contract/replies.py).
Deltas are paced (see `message_pause`): Ray's per-message CPU competes with the model for cores.
Everything worth testing lives in `engine/`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import psutil
import ray
from ray import serve

from engine.engine import Engine, EngineStats
from engine.errors import EngineError
from engine.request import GenerationRequest, RequestEnd, RequestOutput

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall, TokenizeCall, Tokenized
from deployments.contract.replies import Item, ReplyEnd, carry_last_delta
from deployments.contract.runtime_adapters import RuntimeAdapter, folder_problem
from deployments.contract.settings import AppArgs, BatchSettings
from deployments.replica.load_report import RecentTTFT, load_report, routing_stats
from deployments.telemetry.adapter_metrics import app_labels
from deployments.telemetry.metrics import LLMMetrics

log = logging.getLogger("ray.serve")

PAGE_MODELS = 100  # adapters from the stores the chat page offers (the API accepts every one)


class UnlistedAdapterError(RuntimeError):
    """An internal invariant broken, not a user error: a call named an adapter the config does not
    list, without a runtime adapter's folder. Front ends resolve model names first
    (deployments/frontend/served_models.py, the one 404), so this is a caller's bug, answered 500;
    it is raised before the engine could try to load the name."""


def replica_name() -> str:
    """`<replica id>@<node id prefix>`: which replica on which node served a request."""
    replica = serve.get_replica_context().replica_id.unique_id
    return f"{replica}@{ray.get_runtime_context().get_node_id()[:12]}"


def message_pause(full_load_interval_s: float, running: int, full_load_rows: int = 8) -> float:
    """Least time between two messages of a stream: none for a lone stream (every token at
    once), growing with the running rows up to `full_load_interval_s`, where Ray's per-message
    CPU would otherwise take a share of the cores that the model needs."""
    return full_load_interval_s * min(1.0, max(running - 1, 0) / full_load_rows)


class LLMServer:
    """Holds the engine; `stream(call)` yields Deltas and a ReplyEnd, or one ApiError when it
    refuses the call."""

    async def __init__(self, args: AppArgs):
        """Load the model and the preloaded adapters off the event loop."""
        self.args = args
        self.replica = replica_name()
        self.engine = await asyncio.to_thread(Engine.from_config, args.engine_config(), preload=args.preloaded())
        self.metrics = LLMMetrics(args.model_name, app_labels(args))
        self.recent_ttft = RecentTTFT()
        self._apply(args.batch)
        self._gauges: asyncio.Task | None = None

    def reconfigure(self, user_config: dict) -> None:
        """Change batching and generation defaults without a restart."""
        self._apply(BatchSettings.model_validate(user_config))

    def _apply(self, settings: BatchSettings) -> None:
        self.settings = settings
        self._admit.set_max_batch_size(settings.batch_size)
        self._admit.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop has died")

    async def info(self) -> dict:
        """What a chat page needs: model names (base first, then the configured adapters and the
        first PAGE_MODELS the stores hold), prompt template, generation defaults, the API's limits
        (messages, requests per key per minute)."""
        stored = await self.adapter_names(PAGE_MODELS)
        return {
            "models": (self.args.model_name, *dict.fromkeys([*self.args.adapters, *stored])),
            "template": self.engine.prompts.template,
            "defaults": self.settings.defaults,
            "max_messages": self.args.max_messages,
            "request_log_file": self.args.request_log_file,
            "rate_limit_per_minute": self.args.rate_limit_per_minute,
        }

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def adapter_names(self, limit: int = 1000) -> list[str]:
        """The adapters the stores hold (at most `limit`; the store caches its listing)."""
        stores = self.engine.stores
        return await asyncio.to_thread(stores.names, limit) if stores is not None else []

    def record_routing_stats(self) -> dict:
        """What the router reads (deployments/routing/router.py): which adapters are resident here, by
        tier."""
        return routing_stats(self.engine.adapter_report())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler averages for deployments/routing/autoscaling_policy.py: rows, KV,
        TTFT."""
        return load_report(self.engine.stats(), self.args.max_batch_size, self.recent_ttft.median())

    async def diagnostics(self) -> dict:
        """For leak checks and per-replica figures: which replica, engine stats, live asyncio
        tasks, adapters, resident memory."""
        return {
            "replica": self.replica,
            "stats": self.engine.stats(),
            "tasks": len(asyncio.all_tasks()),
            "adapters": self.engine.adapters.names,
            "adapter_report": self.engine.adapter_report(),
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    async def tokenize(self, call: TokenizeCall) -> Tokenized | ApiError:
        """Prompt ids of a chat or a raw prompt, from the prompt builder generation uses."""
        prompts = self.engine.prompts
        try:
            if call.messages is not None:
                tokens = prompts.chat_tokens(call.messages, call.add_generation_prompt)
            else:
                tokens = prompts.text_tokens(call.prompt, call.add_special_tokens)
        except (EngineError, ValueError) as err:
            return ApiError.from_error(err)
        strings = prompts.token_strings(tokens) if call.return_token_strs else None
        return Tokenized(tokens, prompts.context_window, strings)

    async def detokenize(self, tokens: list[int]) -> str | ApiError:
        """The text of `tokens`; a 400 naming `tokens` for ids outside the vocabulary."""
        try:
            return self.engine.prompts.detokenize(tokens)
        except (EngineError, ValueError) as err:
            return ApiError(400, str(err), param="tokens")

    async def stream(self, call: GenerateCall) -> AsyncIterator[Item]:
        """Generate for one call; a client disconnect cancels its engine rows."""
        self._start_gauges()
        try:
            self._check_adapter(call)
            async with self.engine.holding_adapter(call.adapter, call.adapter_source) as waited:
                request = self._prepare(call, waited)
                outputs = await self._admit(request)
        except (EngineError, ValueError, UnlistedAdapterError) as err:
            outputs = err
        if isinstance(outputs, Exception):
            yield ApiError.from_error(outputs)
            return
        try:
            async for item in carry_last_delta(outputs, self.replica):
                if isinstance(item, ReplyEnd):
                    self._count_ttft(item.end)
                yield item
        finally:
            await outputs.aclose()  # cancels the rows if they are still running

    def _count_ttft(self, end: RequestEnd) -> None:
        """The request's TTFT counts for autoscaling."""
        if end.stats is not None and end.stats.time_to_first_token is not None:
            self.recent_ttft.add(end.stats.time_to_first_token)

    def _prepare(self, call: GenerateCall, adapter_load_s: float) -> GenerationRequest:
        """Apply defaults, build the prompt within the context budget (the adapter is resident)."""
        params = call.overrides.resolve(self.settings.defaults)
        if call.messages is not None:
            request = self.engine.chat_request(call.messages, params, call.adapter, tools=call.tools)
        else:
            request = self.engine.completion_request(call.prompt, params, call.adapter)
        request.request_id = call.request_id
        request.adapter_load_s = adapter_load_s
        request.tenant = call.tenant
        return request

    async def load_runtime_adapter(self, adapter: RuntimeAdapter) -> ApiError | None:
        """Check a runtime adapter's folder on this replica's disk and load it here (the other
        replicas load it on first use); a 400 naming lora_path when it cannot be loaded."""
        if problem := folder_problem(adapter.source):
            return ApiError(400, f"lora_path: {problem}", param="lora_path")
        try:
            await self.engine.ensure_adapter(adapter.id, adapter.source)
        except (EngineError, ValueError) as err:
            return ApiError(400, f"lora_path: {err}", param="lora_path")
        return None

    def _check_adapter(self, call: GenerateCall) -> None:
        """The call's adapter is a configured one, a runtime one (with its folder), or, with
        stores, any name (the stores answer 404). Anything else is a caller's bug."""
        name = call.adapter
        if name and call.adapter_source is None and name not in self.args.adapters and not self.args.adapter_stores:
            raise UnlistedAdapterError(f"adapter {name!r} is not in the config and came without a runtime folder")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _admit(self, requests: list[GenerationRequest]) -> list[AsyncIterator[RequestOutput] | Exception]:
        """One admission group: submitted together, so the engine prefills them together. Each
        request gets its stream, or the exception that refused it."""
        self.metrics.batch_size.observe(len(requests))
        return self.engine.submit_group(requests, pace=self._message_pause)

    def _message_pause(self) -> float:
        return message_pause(self.settings.stream_interval_s, self.engine.running)

    def _start_gauges(self) -> None:
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(self.metrics.watch(self.engine))
