"""The Response object of POST /v1/responses, built from a finished chat choice.

A reply becomes output items: a `message` with one `output_text` part when it has text (or no
tool calls), then one `function_call` item per tool call (`call_id` is the chat call's id, the
item's `id` the same with an `fc_` prefix). A reply cut by the token limit (finish_reason
"length") is `status: "incomplete"` with `incomplete_details.reason: "max_output_tokens"`, and so
are its items; else `completed`. Usage: `input_tokens`, `output_tokens`, `total_tokens`.
The object repeats the request's settings (`ResponsesRequest.echo`) and says `store: false`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from deployments.http.openai_format import ChatLogprobs, ChatTokenLogprob, ChoiceOutput, Usage
from deployments.http.structured import ParsedToolCall

ItemStatus = Literal["in_progress", "completed", "incomplete"]
Status = Literal["in_progress", "completed", "incomplete", "failed"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[ChatTokenLogprob] | None = Field(None, description="With include message.output_text.logprobs.")


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallOut(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = Field(description="JSON text (partial when the call was cut by max_output_tokens).")
    status: ItemStatus


OutputItem = Annotated[OutputMessage | FunctionCallOut, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage | None) -> ResponseUsage | None:
        if usage is None:
            return None
        details = usage.prompt_tokens_details
        return cls(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=details.cached_tokens if details else 0))


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """OpenAI's Response (the fields this server fills; `store` is always false)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    parallel_tool_calls: bool = True
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    previous_response_id: None = None
    reasoning: None = None
    store: Literal[False] = False


def item_status(finish_reason: str | None) -> ItemStatus:
    return "incomplete" if finish_reason == "length" else "completed"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: ItemStatus, logprobs: ChatLogprobs | None = None) -> OutputMessage:
    entries = (logprobs.content or []) if logprobs else None
    return OutputMessage(id=item_id, status=status, content=[OutputText(text=text, logprobs=entries)])


def function_call_item(call: ParsedToolCall, status: ItemStatus, arguments: str | None = None) -> FunctionCallOut:
    """The call as an output item (`arguments` "" while a stream has not sent them yet)."""
    return FunctionCallOut(id=f"fc_{call.id.removeprefix('call_')}", call_id=call.id, name=call.name,
                           arguments=call.arguments if arguments is None else arguments, status=status)


def output_items(choice: ChoiceOutput) -> list[OutputItem]:
    """A finished choice's output items (see the module docstring)."""
    status = item_status(choice.finish_reason)
    items: list[OutputItem] = []
    if choice.text or not choice.tool_calls:
        items.append(message_item(new_message_id(), choice.text, status, choice.logprobs))
    items += [function_call_item(call, status) for call in choice.tool_calls or ()]
    return items


@dataclass
class ResponseEnvelope:
    """What every Response object of one request shares: id, creation time, model, the echo."""

    id: str
    model: str
    echo: dict[str, Any]
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: Status, output: list[OutputItem] | None = None, usage: Usage | None = None,
                 finish_reason: str | None = None, error: ResponseError | None = None) -> ResponseObject:
        """The Response object in `status`; a "length" finish makes it incomplete."""
        if status == "completed" and finish_reason == "length":
            status = "incomplete"
        incomplete = IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        return ResponseObject(id=self.id, created_at=self.created_at, model=self.model, status=status,
                              output=output or [], usage=ResponseUsage.of(usage), incomplete_details=incomplete,
                              error=error, **self.echo)

    def finished(self, choice: ChoiceOutput, usage: Usage | None) -> ResponseObject:
        """The whole (non-streamed) response of a finished choice."""
        return self.response("completed", output_items(choice), usage, choice.finish_reason)
