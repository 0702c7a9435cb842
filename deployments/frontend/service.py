"""The request path every front end shares: the HTTP API (deployments/http/api.py) and the chat
page (deployments/ui/page.py).

No HTTP and no Ray here. `RequestService.stream(call, ...)` checks the request's limits, reads
the backend's items for it and, whatever happens (finished, refused, failed, or the consumer
stopped reading), reports how it ended exactly once, through `on_finish` (the request log and
the metrics): 200 finished, the refusal's status, 500 failed, 499 the client left. A request
with n choices has finished when all n have (`Endings`); one failed choice fails it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from engine.request import Delta, RequestStats

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall

Item = Delta | ApiError  # a refusal comes as an item, in place of the deltas
FAILED_FINISHES = ("error", "cancelled")


class Endings:
    """Counts the choices' last deltas; `stats` sums them once all `n` have ended."""

    def __init__(self, n: int):
        self.n = n
        self.ended: list[RequestStats | None] = []

    def add(self, delta: Delta) -> bool:
        """Record a choice's last delta; True when it was the n-th."""
        self.ended.append(delta.stats)
        return len(self.ended) == self.n

    @property
    def stats(self) -> RequestStats | None:
        known = [s for s in self.ended if s is not None]
        if not known:
            return None
        return dataclasses.replace(
            known[0], completion_tokens=sum(s.completion_tokens for s in known),
            latency=max(s.latency for s in known),
        )


class ItemStream(Protocol):
    """One call's items as a backend streams them."""

    def __aiter__(self) -> ItemStream: ...

    async def __anext__(self) -> Item: ...

    def cancel(self) -> None:
        """Stop the generation: the consumer left before the last item."""


class Backend(Protocol):
    """Where a front end's calls run (the LLM deployment through a handle, or a fake)."""

    def stream(self, call: GenerateCall) -> ItemStream: ...


@dataclass(frozen=True)
class Finished:
    """How one request ended, for the request log and metrics (status 499: the client left)."""

    request_id: str
    model: str
    endpoint: str
    status: int
    stats: RequestStats | None = None


class RequestService:
    """Limits, the backend's stream, and one `on_finish` per request."""

    def __init__(self, backend: Backend, on_finish: Callable[[Finished], None] = lambda finished: None,
                 max_messages: int = 256):
        self.backend, self.on_finish, self.max_messages = backend, on_finish, max_messages

    def check(self, call: GenerateCall) -> None:
        """Raise ApiError(400) for a request beyond the limits (before anything is recorded)."""
        if call.messages is not None and len(call.messages) > self.max_messages:
            raise ApiError(400, f"at most {self.max_messages} messages per request", param="messages")

    async def stream(self, call: GenerateCall, model: str, endpoint: str) -> AsyncIterator[Item]:
        """The backend's items up to the last delta or a refusal. Close it (or read it to the
        end) to record the request; closing early cancels the generation."""
        self.check(call)
        status, stats = 499, None
        endings = Endings(call.overrides.n)
        stream = self.backend.stream(call)
        try:
            async for item in stream:
                if isinstance(item, ApiError):
                    status = item.status
                elif item.finish_reason in FAILED_FINISHES:
                    status, stats = 500, item.stats
                elif item.finish_reason and endings.add(item):
                    status, stats = 200, endings.stats
                yield item
                if status != 499:
                    return
            status = 500  # the stream ended without a last delta
        except Exception:
            status = 500
            raise
        finally:
            if status == 499:
                stream.cancel()
            self.on_finish(Finished(call.request_id, model, endpoint, status, stats))
