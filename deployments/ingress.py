"""The HTTP ingress deployment: the FastAPI app of deployments/api.py over a handle to the LLM.

Ray glue only. Each request streams from the LLM deployment through a streaming
DeploymentHandle whose multiplexed model id is the adapter, so requests for an adapter
prefer replicas that already hold it. One log line and metrics per finished request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.api import ApiSettings, Finished, Item, build_api
from deployments.guard import KEYS_ENV, resolve_keys
from deployments.messages import GenerateCall, RequestRejected
from deployments.metrics import RequestMetrics
from deployments.settings import AppArgs

log = logging.getLogger("ray.serve")


class HandleBackend:
    """Streams a call from the LLM deployment."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    def stream(self, call: GenerateCall) -> AsyncIterator[Item]:
        return ShedWhenFull(self.handle.options(multiplexed_model_id=call.adapter or "").stream.remote(call))


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
            return RequestRejected(503, "overloaded_error", "the server is at capacity; retry shortly")

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
        self.metrics = RequestMetrics()
        self.request_log = request_logger(args.request_log_file)
        self.api_keys = resolve_keys(args.api_keys)
        if not self.api_keys:
            log.warning("no API keys set (api_keys or %s): the API is open to anyone who can reach it", KEYS_ENV)

    def __serve_build_asgi_app__(self) -> FastAPI:
        args = self.args
        settings = ApiSettings(
            model_name=args.model_name,
            model_aliases=(args.model,),
            adapters=tuple(args.adapters),
            on_finish=self.record,
            api_keys=self.api_keys,
            rate_limit_per_minute=args.rate_limit_per_minute,
            max_body_bytes=args.max_body_bytes,
            max_messages=args.max_messages,
        )
        return build_api(HandleBackend(self.llm), settings)

    def record(self, finished: Finished) -> None:
        """One line per finished request, like the seed chatbot's app.log, plus metrics; the
        request id is the response's `id`."""
        model, endpoint, status, stats = finished.model, finished.endpoint, finished.status, finished.stats
        self.metrics.record(model, endpoint, status, stats)
        if stats is None:
            self.request_log.info("id=%s model=%s endpoint=%s status=%d", finished.request_id, model, endpoint, status)
            return
        self.request_log.info(
            "id=%s model=%s endpoint=%s status=%d prompt_tokens=%d completion_tokens=%d latency=%.3fs "
            "ttft=%s tokens_per_s=%s dropped_messages=%d replica=%s stop_reason=%s",
            finished.request_id, model, endpoint, status, stats.prompt_tokens, stats.completion_tokens, stats.latency,
            _fmt(stats.time_to_first_token, "{:.3f}s"), _fmt(stats.tokens_per_second, "{:.1f}"),
            stats.dropped_messages, stats.replica or "-", stats.stop_reason or "-",
        )


def request_logger(path: str | None) -> logging.Logger:
    """The per-request logger: Serve's replica log, and `path` too when given."""
    logger = logging.getLogger("ray.serve.requests")
    if path and not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
