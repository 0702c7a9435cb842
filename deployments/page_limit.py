"""The chat page's rate limit: the API's token bucket (guard.RateLimiter), keyed by client address.

The page has no API key to count by, so a client is its address (the browser session's id
when the address is unknown). An address rather than the session: a new session is one page
reload away. Behind a proxy that hides addresses every user shares one bucket; set the limit
with that in mind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr

from deployments.guard import RateLimiter
from deployments.messages import ApiError


def page_client(request: gr.Request | None) -> str:
    """Who sent this page event: the client's address, else the session, else one shared name."""
    client = getattr(request, "client", None) if request is not None else None
    if client is not None and getattr(client, "host", None):
        return f"address:{client.host}"
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"session:{session}" if session else "anonymous"


@dataclass
class PageLimit:
    """`per_minute` replies per client of the page; None: no limit."""

    per_minute: int | None

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.per_minute) if self.per_minute else None

    def refusal(self, request: gr.Request | None) -> ApiError | None:
        """A 429 to show on the page when this client is over the limit (and count the reply if not)."""
        if self.limiter is None or not (wait := self.limiter.retry_after(page_client(request))):
            return None
        return ApiError(429, f"Too many replies from this address: wait {math.ceil(wait)} s and send again.",
                        code="rate_limit_exceeded", retry_after=wait)
