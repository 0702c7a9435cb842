"""The one error type (ApiError), OpenAI's error body it answers with (ErrorResponse), and what a
client may see of an error (`public`: a 500 says only the request id, the log has the details).

The replica yields an ApiError in place of the deltas when it refuses a call; the front ends
raise it and answer with its body.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel

from engine.errors import (
    AdapterNotFoundError, AdapterTimeoutError, EngineDeadError, EngineOverloadedError, InvalidRequestError,
    PromptTooLongError, UnknownAdapterError,
)

log = logging.getLogger("ray.serve")

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "not_found_error", "rate_limit_error", "overloaded_error",
    "server_error",
]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every non-2xx answer and every SSE error event is one of these,
    serialised by `model_dump_json` (the schema the routes declare is the wire format)."""

    error: ErrorDetail

    @classmethod
    def of(cls, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> ErrorResponse:
        return cls(error=ErrorDetail(message=message, type=type, param=param, code=code))


STATUS_TYPES: dict[int, ErrorType] = {
    401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """The one error type: an HTTP status and OpenAI's error fields, and for 429/503 when to retry.

    The routes raise it; the LLM replica yields it instead of a reply's items when it refuses a
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


def internal_error_message(request_id: str) -> str:
    """What a client learns of a failure on our side: that it happened, and where to look."""
    return f"The server had an error while processing request {request_id}; its log has the details."


def internal_error(request_id: str, detail: object) -> ApiError:
    """Log `detail` under the request id; return the generic 500 the client gets."""
    log.error("request %s failed: %s", request_id, detail)
    return generic_500(request_id)


def generic_500(request_id: str) -> ApiError:
    """The 500 a client gets for any failure on our side (the details are logged elsewhere)."""
    return ApiError(500, internal_error_message(request_id), "server_error", code="internal_error")


def public(err: ApiError, request_id: str) -> ApiError:
    """What a client may see of an error: the error itself, or for a 500 the generic one (the
    details go to the log under the request id)."""
    return internal_error(request_id, err.message) if err.status == 500 else err
