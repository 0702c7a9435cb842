"""The request path every front end shares: the HTTP API (deployments/http/api.py) and the chat
page (deployments/ui/page.py).

No HTTP and no Ray here. `RequestService.stream(call, ...)` checks the request's limits, reads
the backend's items for it (deployments/contract/replies.py) and, whatever happens (finished,
refused, failed, or the consumer stopped reading), reports how it ended exactly once, through
`on_finish` (the request log and the metrics): 200 finished, the refusal's status, 500 failed,
499 the client left. The request has ended at its ReplyEnd, which says whether it failed (the
engine's RequestEnd: one failed choice fails it); nothing here counts choices.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from engine.request import RequestStats

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall
from deployments.contract.replies import Item, ReplyEnd


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
    """How one request ended, for the request log and metrics (status 499: the client left);
    `stats` and `replica` from its ReplyEnd, when it came."""

    request_id: str
    model: str
    endpoint: str
    status: int
    stats: RequestStats | None = None
    replica: str = ""


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
        """The backend's items up to the ReplyEnd or a refusal. Close it (or read it to the end)
        to record the request; closing early cancels the generation."""
        self.check(call)
        status, stats, replica = 499, None, ""
        stream = self.backend.stream(call)
        try:
            async for item in stream:
                if isinstance(item, ApiError):
                    status = item.status
                elif isinstance(item, ReplyEnd):
                    status, stats, replica = 500 if item.end.failed else 200, item.end.stats, item.replica
                yield item
                if status != 499:
                    return
            status = 500  # the stream ended without its ReplyEnd
        except Exception:
            status = 500
            raise
        finally:
            if status == 499:
                stream.cancel()
            self.on_finish(Finished(call.request_id, model, endpoint, status, stats, replica))
