"""The HTTP ingress deployment: the FastAPI app of deployments/api.py over a handle to the LLM.

Ray glue only. Each request streams from the LLM deployment through a streaming
DeploymentHandle; the LLM deployment's router (deployments/routing.py) reads the call's adapter
and conversation from the call itself. One log line and metrics per finished request
(request_log.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.adapter_metrics import app_labels
from deployments.api import ApiSettings, Item, build_api
from deployments.guard import KEYS_ENV, resolve_keys
from deployments.messages import ApiError, GenerateCall, TokenizeCall, Tokenized
from deployments.request_log import RequestRecorder
from deployments.runtime_adapters import ActorAdapters, RegistryActor, RuntimeAdapter
from deployments.served_models import CachedNames
from deployments.settings import AppArgs

log = logging.getLogger("ray.serve")


class HandleBackend:
    """Streams a call from the LLM deployment; one-shot calls (tokenize, ...) go through the plain handle."""

    def __init__(self, handle: DeploymentHandle):
        self.calls = handle
        self.handle = handle.options(stream=True)

    def stream(self, call: GenerateCall) -> AsyncIterator[Item]:
        return ShedWhenFull(self.handle.stream.remote(call))

    async def tokenize(self, call: TokenizeCall) -> Tokenized | ApiError:
        return await self.calls.tokenize.remote(call)

    async def detokenize(self, tokens: list[int]) -> str | ApiError:
        return await self.calls.detokenize.remote(tokens)

    async def load_adapter(self, adapter: RuntimeAdapter) -> ApiError | None:
        return await self.calls.load_runtime_adapter.remote(adapter)  # routed like a call for adapter.id


class ShedWhenFull:
    """A handle stream that turns Serve's back-pressure (replica queues full) into a 503 item."""

    def __init__(self, response: DeploymentResponseGenerator):
        self.response = response

    def __aiter__(self) -> ShedWhenFull:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.response.__anext__()
        except BackPressureError:
            self.response = _exhausted()
            return ApiError(503, "the server is at capacity; retry shortly")

    def cancel(self) -> None:
        if hasattr(self.response, "cancel"):
            self.response.cancel()


async def _exhausted() -> AsyncIterator[Item]:
    return
    yield


class Ingress:
    """Serves the OpenAI-compatible API, /generate and /health."""

    def __init__(self, llm: DeploymentHandle, args: AppArgs):
        self.llm, self.args = llm, args
        self.recorder = RequestRecorder(args.request_log_file, app_labels(args))
        self.api_keys = resolve_keys(args.api_keys)
        self.runtime_adapters = ActorAdapters(registry_actor()) if args.allow_runtime_adapters else None
        if not self.api_keys:
            log.warning("no API keys set (api_keys or %s): the API is open to anyone who can reach it", KEYS_ENV)

    def __serve_build_asgi_app__(self) -> FastAPI:
        args = self.args
        settings = ApiSettings(
            model_name=args.model_name,
            model_aliases=(args.model,),
            adapters=tuple(args.adapters),
            on_finish=self.recorder.record,
            api_keys=self.api_keys,
            rate_limit_per_minute=args.rate_limit_per_minute,
            max_body_bytes=args.max_body_bytes,
            max_messages=args.max_messages,
            runtime_adapters=self.runtime_adapters,
            stored_adapters=CachedNames(self.llm.adapter_names.remote) if args.adapter_stores else None,
        )
        return build_api(HandleBackend(self.llm), settings)


def registry_actor():
    """The application's runtime adapter table (deployments/runtime_adapters.py): created by
    the first ingress replica that asks, found by name by every other one. Detached, so it
    outlives the replica that created it."""
    import ray
    from ray import serve

    app = serve.get_replica_context().app_name
    return ray.remote(num_cpus=0)(RegistryActor).options(
        name=f"runtime-adapters-{app}", namespace="lora-serve", get_if_exists=True, lifetime="detached",
    ).remote()
