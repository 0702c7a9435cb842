"""POST /v1/responses: OpenAI's Responses body, and its mapping onto the chat request.

There is one request path: `ResponsesRequest.chat_request()` is the ChatCompletionRequest the
chat route would get for the same conversation, and the route runs it exactly as a chat
(deployments/http/api.py); deployments/http/responses_format.py and responses_stream.py translate the
result. The mapping:

- `instructions`: a system message first. `input`: a string (one user message) or a list of
  items: messages (`role` user, assistant, system or developer; content a string or text
  parts: `input_text`, `output_text`, `refusal`), `function_call` items (one assistant turn's
  `tool_calls`: consecutive calls, and the assistant text just before them, are one turn) and
  `function_call_output` items (`role: "tool"` messages answering `call_id`).
- `tools` (flat function tools: `{type, name, description, parameters, strict}`) and
  `tool_choice` (`auto`, `none`, `required`, `{"type": "function", "name"}`) are chat's tools;
  `text.format` (`text`, `json_object`, `json_schema` with `name`, `schema`, `strict`) is chat's
  `response_format`; `max_output_tokens`, `temperature`, `top_p` its sampling fields;
  `include: ["message.output_text.logprobs"]` with `top_logprobs` its logprobs.

Responses are not stored: `previous_response_id` is a 400 saying so (send the whole
conversation in `input`), and so are `conversation`, `prompt` (stored prompt templates) and
`background: true`. `store` is accepted and ignored like the other fields that cannot change
the reply (deployments/http/ignored_fields.py, IgnoredResponsesFields). Other requests for what
this server does not do answer 400 naming the field: built-in tools (web search, file search,
...), image, file or audio content, input items other than the three above, reasoning with an
effort above `minimal` (the models here do not reason). Unknown fields are a 400 too.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator,
    model_validator,
)

from engine.config import Logprobs, MaxTokens, Temperature, TopP

from deployments.http.ignored_fields import IgnoredResponsesFields
from deployments.http.protocol import ChatCompletionRequest, ChatMessageIn, StrictBody, Text
from deployments.http.structured import (
    FunctionCallIn, FunctionDef, FunctionName, JsonObjectFormat, JsonSchema, JsonSchemaFormat, JsonSchemaSpec,
    NamedToolChoice, TextFormat, ToolCallIn, ToolDef,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# `include` values: logprobs, or parts of items this server never produces (nothing to add)
Includable = Literal[
    "message.output_text.logprobs", "reasoning.encrypted_content", "web_search_call.action.sources",
    "web_search_call.results", "code_interpreter_call.outputs", "computer_call_output.output.image_url",
    "file_search_call.results", "message.input_image.image_url",
]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
NOT_STORED = ("responses are not stored on this server: send the whole conversation in `input` "
              "(earlier output items included) instead of {field}")


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _only(kinds: tuple[str, ...], what: str, default: str | None = None):
    """A before-validator: a dict whose `type` (or `default`) is not one of `kinds` is a 400
    saying which kinds this server takes, instead of pydantic's union noise."""

    def check(value: Any) -> Any:
        kind = value.get("type", default) if isinstance(value, dict) else None
        if isinstance(value, dict) and kind not in kinds:
            raise ValueError(f"{what} of type {kind!r} are not supported here: only {', '.join(kinds)}")
        return value

    return BeforeValidator(check)


class InputText(StrictBody):
    type: Literal["input_text"]
    text: Text


class OutputTextIn(StrictBody):
    """An earlier reply's text, as the client sends its output items back."""

    type: Literal["output_text"]
    text: Text
    annotations: list[dict[str, Any]] = Field(default_factory=list, max_length=0)
    logprobs: list[dict[str, Any]] | None = None


class RefusalIn(StrictBody):
    type: Literal["refusal"]
    refusal: Text


TEXT_PARTS = ("input_text", "output_text", "refusal")
ContentPart = Annotated[InputText | OutputTextIn | RefusalIn, Field(discriminator="type"),
                        _only(TEXT_PARTS, "content parts")]


def _part_text(part: InputText | OutputTextIn | RefusalIn) -> str:
    return part.refusal if isinstance(part, RefusalIn) else part.text


class MessageItem(StrictBody):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[ContentPart]
    id: Text | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = Field(None, description="Ignored.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(map(_part_text, self.content))


class FunctionCallItem(StrictBody):
    """A call the model made earlier (an output item sent back)."""

    type: Literal["function_call"]
    call_id: Text = Field(min_length=1)
    name: Text
    arguments: Text
    id: Text | None = None
    status: ItemStatus | None = None

    @field_validator("arguments")
    @classmethod
    def _json_text(cls, arguments: str) -> str:
        try:
            json.loads(arguments)
        except ValueError:
            raise ValueError("arguments must be JSON text") from None
        return arguments

    def tool_call(self) -> ToolCallIn:
        return ToolCallIn(id=self.call_id, function=FunctionCallIn(name=self.name, arguments=self.arguments))


class FunctionCallOutputItem(StrictBody):
    """The client's result of a call (`call_id`), for the model to read."""

    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1)
    output: Text | list[Annotated[InputText, _only(("input_text",), "function_call_output parts")]]
    id: Text | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_type(item: Any) -> str | None:
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)


InputItem = Annotated[
    Annotated[
        Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
        | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
        Discriminator(_item_type),
    ],
    _only(ITEM_TYPES, "input items", default="message"),
]


class FunctionTool(FunctionDef):
    """A function tool, flat as the Responses API has it (chat nests it under `function`)."""

    type: Literal["function"]
    parameters: JsonSchema | None = None

    def to_chat(self) -> ToolDef:
        parameters = self.parameters if self.parameters is not None else {"type": "object", "properties": {}}
        function = FunctionDef.model_construct(name=self.name, description=self.description, parameters=parameters,
                                               strict=self.strict)
        return ToolDef.model_construct(type="function", function=function)


ResponsesTool = Annotated[FunctionTool, _only(("function",), "tools")]


class FunctionChoice(StrictBody):
    type: Literal["function"]
    name: Text


class JsonSchemaTextFormat(StrictBody):
    type: Literal["json_schema"]
    name: str = Field(max_length=64)
    schema_: JsonSchema = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormats = Annotated[TextFormat | JsonObjectFormat | JsonSchemaTextFormat, Field(discriminator="type")]


class TextConfig(StrictBody):
    format: TextFormats | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(
        None, description="Ignored: a hint these models cannot take (the reply is what it would be without it).")

    def response_format(self) -> TextFormat | JsonObjectFormat | JsonSchemaFormat | None:
        """Chat's `response_format` for this text format."""
        if not isinstance(self.format, JsonSchemaTextFormat):
            return self.format
        spec = JsonSchemaSpec.model_construct(name=self.format.name, description=self.format.description,
                                              schema_=self.format.schema_, strict=self.format.strict)
        return JsonSchemaFormat.model_construct(type="json_schema", json_schema=spec)


class Reasoning(StrictBody):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: None = Field(None, description="Not supported: these models do not reason.")
    generate_summary: None = Field(None, description="Not supported: these models do not reason.")

    @field_validator("effort")
    @classmethod
    def _no_reasoning(cls, effort: str | None) -> str | None:
        if effort not in (None, "none", "minimal"):
            raise ValueError(f"reasoning effort {effort!r} is not supported: the models served here do not reason "
                             "(only null, 'none' or 'minimal')")
        return effort


class ResponsesRequest(IgnoredResponsesFields, StrictBody):
    """POST /v1/responses; `chat_request()` is the chat request it maps onto (module docstring)."""

    model: Text
    input: Text | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[ResponsesTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    text: TextConfig | None = None
    include: list[Includable] | None = Field(
        None, description=f"`{LOGPROBS_INCLUDE}` adds logprobs; the others name items this server never makes.")
    top_logprobs: Logprobs | None = Field(None, description=f"With include `{LOGPROBS_INCLUDE}`: the N most likely.")
    stream: bool = False
    reasoning: Reasoning | None = None
    previous_response_id: Text | None = Field(None, description="Not supported: responses are not stored.")
    conversation: None = Field(None, description="Not supported: conversations are not stored.")
    prompt: None = Field(None, description="Not supported: no stored prompt templates.")
    background: bool | None = Field(None, description="Only false: no background responses.")
    _chat: ChatCompletionRequest | None = PrivateAttr(None)

    @field_validator("previous_response_id")
    @classmethod
    def _not_stored(cls, response_id: str | None) -> None:
        if response_id is not None:
            raise ValueError(NOT_STORED.format(field="previous_response_id"))
        return None

    @field_validator("background")
    @classmethod
    def _foreground(cls, background: bool | None) -> bool | None:
        if background:
            raise ValueError("background responses are not supported: responses are not stored; "
                             "use stream: true for a long reply")
        return background

    @model_validator(mode="after")
    def _as_chat(self) -> ResponsesRequest:
        """Build the chat request once; its own checks (e.g. a tool_choice naming a function
        not offered) become this body's 400."""
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and self.text and isinstance(self.text.format, (JsonObjectFormat, JsonSchemaTextFormat)):
            raise ValueError("text.format cannot be combined with a required or named tool_choice")
        try:
            self._chat = self._build_chat()
        except ValidationError as err:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None
        return self

    def chat_request(self) -> ChatCompletionRequest:
        assert self._chat is not None  # built by the validator
        return self._chat

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def _build_chat(self) -> ChatCompletionRequest:
        fields: dict[str, Any] = {
            "model": self.model, "messages": self.chat_messages(), "stream": self.stream,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "tools": [tool.to_chat() for tool in self.tools] if self.tools else None,
            "tool_choice": self._chat_tool_choice(),
            "response_format": self.text.response_format() if self.text else None,
        }
        if self.wants_logprobs:
            fields.update(logprobs=True, top_logprobs=self.top_logprobs)
        return ChatCompletionRequest(**{name: value for name, value in fields.items() if value is not None})

    def _chat_tool_choice(self) -> str | NamedToolChoice | None:
        if isinstance(self.tool_choice, FunctionChoice):
            return NamedToolChoice(type="function", function=FunctionName(name=self.tool_choice.name))
        return self.tool_choice

    def chat_messages(self) -> list[ChatMessageIn]:
        """`instructions` and `input` as chat messages (see the module docstring)."""
        messages = [ChatMessageIn(role="system", content=self.instructions)] if self.instructions is not None else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append(ChatMessageIn(role=item.role, content=item.text()))
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(ChatMessageIn(role="tool", content=item.text(), tool_call_id=item.call_id))
            elif messages and messages[-1].role == "assistant":  # the same turn's text or calls before it
                last = messages[-1]
                messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), item.tool_call()]})
            else:
                messages.append(ChatMessageIn(role="assistant", content=None, tool_calls=[item.tool_call()]))
        return messages

    def echo(self) -> dict[str, Any]:
        """What a Response object repeats of its request (OpenAI's echo of the settings)."""
        text = self.text.model_dump(by_alias=True, exclude_none=True) if self.text and self.text.format else {}
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "metadata": self.metadata or {},
            "tool_choice": (self.tool_choice.model_dump() if isinstance(self.tool_choice, FunctionChoice)
                            else self.tool_choice or "auto"),
            "tools": [tool.model_dump(exclude_none=True) for tool in self.tools or ()],
            "text": {"format": {"type": "text"}, **text},
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "truncation": self.truncation or "disabled", "top_logprobs": self.top_logprobs,
        }
