"""What the LLM deployment streams back for a GenerateCall (messages.py): the engine's Deltas as
they are, then one ReplyEnd, the last item; or one ApiError (errors.py) when it refuses the call.

The replica adds what only the server knows by wrapping the engine's results, never by writing
into them: a ReplyEnd is the engine's RequestEnd (engine/request.py: each choice's finish, the
stats with the usage, the error, and whether the request failed) and the replica that ran it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import Delta, RequestEnd

from deployments.contract.errors import ApiError


@dataclass
class ReplyEnd:
    """A generation's last item: how the engine's request ended, and where it ran."""

    end: RequestEnd
    replica: str = ""  # `<replica id>@<node id prefix>` (deployments/replica/llm.py)


Item = Delta | ReplyEnd | ApiError
"""One item of a generation's stream."""
