"""What the ingress sends to the LLM deployment and what comes back, besides engine Deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import SamplingOverrides
from engine.errors import (
    EngineDeadError, EngineOverloadedError, InvalidRequestError, PromptTooLongError, UnknownAdapterError,
)
from engine.prompt import ChatMessage, Instruction
from engine.request import new_request_id

ErrorType = Literal["invalid_request_error", "not_found_error", "overloaded_error", "server_error"]


@dataclass
class GenerateCall:
    """One generation: a chat (messages) or a completion (prompt), for the base model or an
    adapter: the whole ingress-to-replica contract (no HTTP types). `overrides` holds what the
    caller set; the replica fills the rest from its current defaults. `request_id` is the id
    the client sees, the engine uses and the logs show."""

    overrides: SamplingOverrides
    adapter: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | Instruction | None = None
    request_id: str = ""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerateCall has either messages or a prompt")
        self.request_id = self.request_id or new_request_id()


@dataclass
class RequestRejected:
    """The request failed before producing any token; `status` is the HTTP status to answer."""

    status: int
    type: ErrorType
    message: str

    @classmethod
    def from_error(cls, err: Exception) -> RequestRejected:
        if isinstance(err, UnknownAdapterError):
            return cls(404, "not_found_error", str(err))
        if isinstance(err, PromptTooLongError):
            return cls(413, "invalid_request_error", str(err))
        if isinstance(err, (InvalidRequestError, ValueError)):
            return cls(400, "invalid_request_error", str(err))
        if isinstance(err, EngineOverloadedError):
            return cls(503, "overloaded_error", str(err))
        if isinstance(err, EngineDeadError):  # Serve replaces this replica; a retry goes elsewhere
            return cls(503, "server_error", str(err))
        return cls(500, "server_error", f"internal error: {err}")
