"""Who may call the API and how much: API keys, per-key rate limits, request body size.

Keys come from the `api_keys` arg and the LLM_API_KEYS environment variable (comma
separated). They are compared in constant time and never logged; a client is identified
in logs and limits only by a short hash of its key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.contract.errors import ErrorResponse

KEYS_ENV = "LLM_API_KEYS"


def resolve_keys(configured: Iterable[str] = ()) -> tuple[str, ...]:
    """Configured keys plus those in LLM_API_KEYS; empty means the API is open."""
    from_env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",")]
    return tuple(dict.fromkeys(k for k in [*configured, *from_env] if k))


def key_matches(candidate: str, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every key (no early exit on a match)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def client_id(key: str) -> str:
    """A stable, non-reversible name for a key, fit for logs and limiter buckets."""
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else "anonymous"


@dataclass
class RateLimiter:
    """A token bucket per client: `per_minute` requests, refilled continuously."""

    per_minute: int
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, at)

    def retry_after(self, client: str, now: float | None = None) -> float:
        """0 if the client may send a request now (and count it), else seconds to wait."""
        now = time.monotonic() if now is None else now
        capacity, rate = float(self.per_minute), self.per_minute / 60.0
        tokens, at = self.buckets.get(client, (capacity, now))
        tokens = min(capacity, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self.buckets[client] = (tokens - 1.0, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1.0 - tokens) / rate


class BodySizeLimit:
    """ASGI middleware: answer 413 when a request body is larger than `max_bytes`.

    The body is read (at most `max_bytes` of it) before the app runs, then handed to the
    app as one message; later receives (disconnect notices) pass through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await reject_too_large(send, self.max_bytes)
        try:
            body = await read_body(receive, self.max_bytes)
        except BodyTooLarge:
            return await reject_too_large(send, self.max_bytes)
        if body is not None:
            await self.app(scope, replay(body, receive), send)


class BodyTooLarge(Exception):
    """A request body beyond the limit `read_body` was given."""


async def read_body(receive: Receive, max_bytes: int) -> bytes | None:
    """A request's whole body (None if the client disconnected first); BodyTooLarge beyond `max_bytes`."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > max_bytes:
            raise BodyTooLarge
    return body


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` as one message, then passes later ones (disconnect notices) through."""
    first: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return first.pop() if first else await receive()

    return receive_again


async def reject_too_large(send: Send, max_bytes: int) -> None:
    """A 413 in OpenAI's error JSON."""
    error = ErrorResponse.of(f"the request body is larger than {max_bytes} bytes", code="body_too_large")
    body = error.model_dump_json().encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
