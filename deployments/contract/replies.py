"""What the LLM deployment streams back for a GenerateCall (messages.py): the engine's Deltas as
they are, then one ReplyEnd, the last item; or one ApiError (errors.py) when it refuses the call.
Over Ray the request's final delta rides inside its ReplyEnd (`last`: one message, not two, since
every message costs the proxy and replicas CPU); the handle side (deployments/frontend/handle.py)
unpacks it, so readers of a Backend's stream see the delta, then the end.

The replica adds what only the server knows by wrapping the engine's results, never by writing
into them: a ReplyEnd is the engine's RequestEnd (engine/request.py: each choice's finish, the
stats with the usage, the error, and whether the request failed) and the replica that ran it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.request import Delta, RequestEnd

from deployments.contract.errors import ApiError


@dataclass
class ReplyEnd:
    """A generation's last item: how the engine's request ended, and where it ran."""

    end: RequestEnd
    replica: str = ""  # `<replica id>@<node id prefix>` (deployments/replica/llm.py)
    last: Delta | None = None  # the delta just before the end, carried in the same Ray message

    def items(self) -> list[Delta | ReplyEnd]:
        """The stream items this message stands for: the carried delta (if any), then the end."""
        if self.last is None:
            return [self]
        return [self.last, ReplyEnd(self.end, self.replica)]


Item = Delta | ReplyEnd | ApiError
"""One item of a generation's stream."""


async def carry_last_delta(outputs: AsyncIterator[Delta | RequestEnd], replica: str) -> AsyncIterator[Delta | ReplyEnd]:
    """The engine's stream as the replica sends it: every delta as it comes, but a choice's
    last delta (it has a finish reason) waits for the next item, and rides inside the ReplyEnd
    when that is the request's end. A delta with no finish reason is never held."""
    held: Delta | None = None
    async for output in outputs:
        if isinstance(output, RequestEnd):
            yield ReplyEnd(output, replica, last=held)
            return
        if held is not None:
            yield held
            held = None
        if output.finish_reason:
            held = output
        else:
            yield output
    if held is not None:
        yield held
