"""The rule for OpenAI request fields that are not ours to compute, written once.

Every field of OpenAI's current chat and completions APIs (openai SDK 3.x
`completion_create_params`) that the server does not implement falls in one of two groups,
declared here as pydantic mixins of the request bodies (deployments/http/protocol.py):

1. Accepted and ignored (`IgnoredFields` subclasses): fields that cannot change what this server
   computes, for OpenAI's own storage, billing, caching, abuse tracking and routing (`store`,
   `metadata`, `service_tier`, `prompt_cache_*`, `safety_identifier`, `user`, ...). A client
   that always sends them (an SDK, an agent framework) must not fail on a server that has no
   use for them. `ignored_fields` names the ones a request set, for one debug log line.
   `reasoning_effort` and `verbosity` are here too, although they ask the model for something:
   they are hints that OpenAI's own models follow loosely, the default model (SmolLM2) has no
   reasoning mode and no length control, and no template this server renders reads them (vLLM
   passes `reasoning_effort` to the chat template, which only reasoning models' templates use).
   Refusing them would break clients that set them once for every model; honouring them is
   not possible here. `parallel_tool_calls` is ignored as well: a forced call is always one.
2. Not supported (`UnsupportedChatFields`): fields that ask for work this server does not do:
   audio output (`audio`, `modalities` with "audio"), web search (`web_search_options`),
   predicted outputs (`prediction` with content), moderation (`moderation`) and the legacy
   `functions` / `function_call` (use `tools`). Null (and `modalities: ["text"]`) is accepted;
   anything else is a 400 naming the field and saying it is not supported: a reply that
   quietly is not what was asked for is worse than an error.

Unknown fields (in neither group, nor a field the server implements) are a 400 naming the
field: OpenAI's rule (`extra="forbid"` on the bodies), not vLLM's (accept, log, ignore). A
misspelt field (`max_token`, `temprature`, `stop_sequences`) then fails loudly instead of being
silently dropped and answered with defaults, and a field OpenAI adds later is refused until it
is placed in one of the groups above, where its effect has been thought about.

A new group of ignored fields (another endpoint's) subclasses `IgnoredFields` in this module;
`ignored_fields` finds it in the body's bases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from engine.prompt import valid_text

logger = logging.getLogger(__name__)

Text = Annotated[str, AfterValidator(valid_text)]  # as protocol.py's: valid UTF-8 or a 400 naming the field


class IgnoredFields(BaseModel):
    """Base of the mixins of fields that are accepted and ignored (group 1)."""


class IgnoredCompletionFields(IgnoredFields):
    """Completions fields with no effect on the generated tokens."""

    user: Text | None = Field(None, description="Ignored (OpenAI: an end-user id for abuse tracking).")


class IgnoredChatFields(IgnoredCompletionFields):
    """Chat fields with no effect on the generated tokens."""

    store: bool | None = Field(None, description="Ignored: nothing is stored.")
    metadata: dict[Text, Text] | None = Field(None, max_length=16, description="Ignored (OpenAI: up to 16 pairs).")
    service_tier: Text | None = Field(None, description="Ignored: one tier.")
    parallel_tool_calls: bool | None = Field(None, description="Ignored: a forced tool call is always one call.")
    prompt_cache_key: Text | None = Field(None, description="Ignored: the prefix cache is automatic.")
    prompt_cache_retention: Text | None = Field(None, description="Ignored: the prefix cache is automatic.")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="Ignored: the prefix cache is automatic.")
    safety_identifier: Text | None = Field(None, description="Ignored.")
    reasoning_effort: Text | None = Field(None, description="Ignored: the served models have no reasoning mode.")
    verbosity: Text | None = Field(None, description="Ignored: a hint the served models cannot follow.")


class IgnoredContentPartFields(IgnoredFields):
    """Fields of a message's content part with no effect on the generated tokens."""

    prompt_cache_breakpoint: dict[str, Any] | None = Field(None, description="Ignored: the prefix cache is automatic.")


def _not_null(value: Any) -> bool:
    return value is not None


def unsupported(what: str, refused: Callable[[Any], bool] = _not_null) -> BeforeValidator:
    """A field whose value is refused when `refused(value)` (default: anything but null),
    saying `what` is not supported (the 400 names the field)."""

    def check(value: Any) -> Any:
        if refused(value):
            raise PydanticCustomError("not_supported", "{what} is not supported by this server", {"what": what})
        return value

    return BeforeValidator(check)


def _asks_audio(modalities: Any) -> bool:
    return isinstance(modalities, list) and "audio" in modalities


class UnsupportedChatFields(BaseModel):
    """Chat fields that ask for work this server does not do (group 2): null only."""

    audio: Annotated[Any, unsupported("audio output")] = Field(None, description="Not supported: only null.")
    modalities: Annotated[list[Literal["text"]] | None, unsupported("audio output", _asks_audio)] = Field(
        None, description='Only ["text"].')
    prediction: Annotated[Any, unsupported("predicted output")] = Field(None, description="Not supported: only null.")
    web_search_options: Annotated[Any, unsupported("web search")] = Field(None, description="Not supported: only null.")
    moderation: Annotated[Any, unsupported("moderation")] = Field(None, description="Not supported: only null.")
    functions: Annotated[Any, unsupported("legacy function calling (use tools)")] = Field(
        None, description="Not supported: use tools.")
    function_call: Annotated[Any, unsupported("legacy function calling (use tool_choice)")] = Field(
        None, description="Not supported: use tool_choice.")


def ignored_fields(body: BaseModel) -> list[str]:
    """The ignored fields this request set (sent with a non-null value): those of every
    `IgnoredFields` mixin of this module among the body's bases."""
    mixins = [cls for cls in type(body).__mro__
              if isinstance(cls, type) and issubclass(cls, IgnoredFields) and cls.__module__ == __name__]
    names = dict.fromkeys(name for cls in reversed(mixins) for name in cls.model_fields)
    return [name for name in names if name in body.model_fields_set and getattr(body, name) is not None]


def log_ignored(body: BaseModel, request_id: str) -> None:
    """One debug line naming the ignored fields the request set, if any."""
    if names := ignored_fields(body):
        logger.debug("request %s: ignored fields %s", request_id, ", ".join(names))


class ResponsesStreamOptions(BaseModel):
    model_config = {"extra": "forbid"}

    include_obfuscation: bool | None = Field(None, description="Ignored: no obfuscation padding is sent.")


class IgnoredResponsesFields(IgnoredFields):
    """/v1/responses fields with no effect on the generated tokens (mixed into its body,
    deployments/http/responses.py). `store` defaults to true in OpenAI's SDK: accepted, and nothing
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

