"""What the ingress sends to the LLM deployment (GenerateCall) and the one error type (ApiError)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.config import SamplingOverrides
from engine.errors import (
    AdapterNotFoundError, AdapterTimeoutError, EngineDeadError, EngineOverloadedError, InvalidRequestError,
    PromptTooLongError, UnknownAdapterError,
)
from engine.prompt import ChatMessage, Instruction
from engine.request import new_request_id

from deployments.openai_format import ErrorResponse

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "not_found_error", "rate_limit_error", "overloaded_error",
    "server_error",
]


@dataclass
class GenerateCall:
    """One generation: a chat (messages) or a completion (prompt), for the base model or an
    adapter (a runtime adapter with its folder, so any replica can load it): the whole
    ingress-to-replica contract (no HTTP types). `overrides` holds what the
    caller set; the replica fills the rest from its current defaults. `request_id` is the id
    the client sees, the engine uses and the logs show. `tenant` is who asked, for the
    engine's fair share (engine/fairness.py): None when the API has no keys."""

    overrides: SamplingOverrides
    adapter: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | Instruction | None = None
    tools: list[dict] = field(default_factory=list)  # offered to a chat (engine/tools.py)
    request_id: str = ""
    adapter_source: str | None = None  # a runtime adapter's folder (deployments/runtime_adapters.py)
    tenant: str | None = None  # the caller's API key as `guard.client_id` (never the key); fair share counts by it

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerateCall has either messages or a prompt")
        self.request_id = self.request_id or new_request_id()


@dataclass
class TokenizeCall:
    """What /tokenize asks of a replica: a chat (built by the same prompt builder as a chat
    request, so `len(tokens)` is its `usage.prompt_tokens` unless old turns must be dropped)
    or a raw prompt (as /v1/completions encodes it with `add_special_tokens`)."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False


@dataclass
class Tokenized:
    tokens: list[int]
    max_model_len: int
    token_strs: list[str] | None = None


STATUS_TYPES: dict[int, ErrorType] = {
    401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """The one error type: an HTTP status and OpenAI's error fields, and for 429/503 when to retry.

    The routes raise it; the LLM replica yields it instead of a delta stream when it refuses a
    request (a value crosses Ray as it is, where an exception would come wrapped); `from_error`
    is the one mapping from engine errors to HTTP. A 500's message is internal: clients get
    `public(request_id)` instead.
    """

    def __init__(self, status: int, message: str, type: ErrorType | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or STATUS_TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after

    def __reduce__(self):
        return ApiError, (self.status, self.message, self.type, self.param, self.code, self.retry_after)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiError) and self.__reduce__() == other.__reduce__()

    __hash__ = Exception.__hash__

    @property
    def body(self) -> ErrorResponse:
        return ErrorResponse.of(self.message, self.type, self.param, self.code)

    @classmethod
    def from_error(cls, err: Exception) -> ApiError:
        """An engine error (or a bad value) as the answer the client gets."""
        if isinstance(err, ApiError):
            return err
        if isinstance(err, AdapterNotFoundError):  # a name no store holds: OpenAI's unknown model
            return cls(404, str(err), "invalid_request_error", "model", "model_not_found")
        if isinstance(err, UnknownAdapterError):
            return cls(404, str(err), "not_found_error")
        if isinstance(err, AdapterTimeoutError):
            return cls(504, str(err), "server_error", "model", "adapter_load_timeout")
        if isinstance(err, PromptTooLongError):
            return cls(413, str(err))
        if isinstance(err, (InvalidRequestError, ValueError)):
            return cls(400, str(err))
        if isinstance(err, EngineOverloadedError):
            return cls(503, str(err))
        if isinstance(err, EngineDeadError):  # Serve replaces this replica; a retry goes elsewhere
            return cls(503, str(err), "server_error")
        return cls(500, f"internal error: {err!r}")
