"""OpenAI request fields that cannot change the reply: accepted, ignored, logged once.

OpenAI's chat create parameters (openai SDK 3.x `completion_create_params`) include fields for
its own storage, billing, caching and abuse tracking. They do not change the tokens a model
generates, so a client that always sends them (an SDK, an agent framework) should not fail on
a server that has no use for them. They are accepted and ignored; `ignored_fields` names the
ones a request set, for one debug log line. Fields that would change the output and are not
implemented (e.g. audio or image content, `modalities` with audio, `web_search_options`,
`reasoning_effort`) stay out of this list and answer 400 naming the field (protocol.py's bodies
forbid unknown fields).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)


class IgnoredChatFields(BaseModel):
    """Chat fields with no effect on the generated tokens (mixed into the chat request body)."""

    store: bool | None = Field(None, description="Ignored: nothing is stored.")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Ignored (OpenAI: up to 16 pairs).")
    service_tier: str | None = Field(None, description="Ignored: one tier.")
    parallel_tool_calls: bool | None = Field(None, description="Ignored.")
    prediction: None = Field(None, description="Predicted outputs are not supported: only null.")
    prompt_cache_key: str | None = Field(None, description="Ignored: the prefix cache is automatic.")
    prompt_cache_retention: str | None = Field(None, description="Ignored.")
    safety_identifier: str | None = Field(None, description="Ignored.")
    modalities: list[Literal["text"]] | None = Field(None, description="Only ['text'].")


IGNORED = ("user", *IgnoredChatFields.model_fields)


def ignored_fields(body: BaseModel) -> list[str]:
    """The ignored fields this request set (sent with a non-null value)."""
    return [name for name in IGNORED if name in body.model_fields_set and getattr(body, name) is not None]


def log_ignored(body: BaseModel, request_id: str) -> None:
    """One debug line naming the ignored fields the request set, if any."""
    if names := ignored_fields(body):
        logger.debug("request %s: ignored fields %s", request_id, ", ".join(names))


class ResponsesStreamOptions(BaseModel):
    model_config = {"extra": "forbid"}

    include_obfuscation: bool | None = Field(None, description="Ignored: no obfuscation padding is sent.")


class IgnoredResponsesFields(BaseModel):
    """/v1/responses fields with no effect on the generated tokens (mixed into its body,
    deployments/responses.py). `store` defaults to true in OpenAI's SDK: accepted, and nothing
    is stored all the same. `truncation`: whatever it says, a conversation beyond the context
    window loses its oldest turns (the system message kept), as chat requests do. `max_tool_calls`
    bounds OpenAI's built-in tools, which this server has none of."""

    store: bool | None = Field(None, description="Ignored: responses are not stored.")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Ignored (OpenAI: up to 16 pairs); "
                                            "repeated in the response.")
    user: str | None = Field(None, description="Ignored.")
    service_tier: str | None = Field(None, description="Ignored: one tier.")
    safety_identifier: str | None = Field(None, description="Ignored.")
    prompt_cache_key: str | None = Field(None, description="Ignored: the prefix cache is automatic.")
    prompt_cache_retention: str | None = Field(None, description="Ignored.")
    parallel_tool_calls: bool | None = Field(None, description="Ignored: a forced call is always one call.")
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="Ignored: the oldest turns of a conversation beyond the context window are dropped.")
    max_tool_calls: int | None = Field(None, ge=1, description="Ignored: no built-in tools.")
    stream_options: ResponsesStreamOptions | None = None


def log_ignored_responses(body: IgnoredResponsesFields, request_id: str) -> None:
    """One debug line naming the ignored /v1/responses fields the request set, if any."""
    names = [name for name in IgnoredResponsesFields.model_fields
             if name in body.model_fields_set and getattr(body, name) is not None]
    if names:
        logger.debug("request %s: ignored fields %s", request_id, ", ".join(names))
