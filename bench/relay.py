"""A relay in front of a server under test, so one load generator can drive two servers that
spell "ignore EOS" differently.

guidellm sends every request with `ignore_eos: true` and `stream_options.continuous_usage_stats`
(vLLM's extensions). Ours takes both; `transformers serve` answers 422 to both. The relay
forwards every request to its target, streaming the answer back unchanged; with `rewrite`
set it replaces `ignore_eos: true` by transformers serve's own way to say it (a generation
config whose `eos_token_id` is -1, bench/systems.py) and drops `continuous_usage_stats`.
Both systems are measured through a relay, so the extra hop costs them the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench.systems import TRANSFORMERS_IGNORE_EOS, uvicorn_thread

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "host"}


def rewrite_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body as transformers serve takes it: ignore_eos as a generation config, no continuous usage."""
    body = dict(body)
    if body.pop("ignore_eos", False):
        body.update(TRANSFORMERS_IGNORE_EOS)
    options = dict(body.get("stream_options") or {})
    options.pop("continuous_usage_stats", None)
    if "stream_options" in body:
        body["stream_options"] = options or None
    return {key: value for key, value in body.items() if value is not None or key != "stream_options"}


def relay_app(target: str, rewrite: bool) -> Starlette:
    """An ASGI app forwarding every request to `target` (base URL), the body rewritten if asked."""
    client = httpx.AsyncClient(base_url=target, timeout=None, limits=httpx.Limits(max_connections=256))

    async def forward(request: Request) -> StreamingResponse:
        content = await request.body()
        if rewrite and content and request.method == "POST":
            content = json.dumps(rewrite_body(json.loads(content))).encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream = await client.send(client.build_request(
            request.method, request.url.path, params=request.query_params, headers=headers, content=content),
            stream=True)
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(upstream.aiter_raw(), upstream.status_code, kept,
                                 background=BackgroundTask(upstream.aclose))

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


@contextmanager
def relay(target: str, rewrite: bool) -> Iterator[str]:
    """A relay to `target` on a free port in a background thread; yields its base URL."""
    with uvicorn_thread(relay_app(target, rewrite), "relay") as url:
        yield url
