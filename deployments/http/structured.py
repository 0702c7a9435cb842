"""Chat request fields for structured output and tools: bodies, grammars, and the tools prompt.

- `response_format`: `json_object` constrains the reply to a JSON object, `json_schema` to the
  given schema (`strict` or not: the grammar is always enforced). A schema llguidance cannot
  use is a 400 naming `response_format.json_schema.schema`.
- `tools` and `tool_choice`: the replica puts the tools in the prompt, through the chat
  template's own tool support when its call format is Hermes', as Hermes text otherwise
  (engine/tools.py has the per-template rule); either way a call is
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. `auto` lets the model
  choose; `none` leaves the tools out of the prompt; `required` and a named function constrain
  the reply to one such call with a grammar (llguidance's Lark with the arguments' JSON schema
  embedded, closed as OpenAI's strict mode reads it: closed_schema.py). `auto` has no grammar,
  not even after the model opens a call: the reply is free text and its calls are read
  afterwards (tool_calls.py, as `ParsedToolCall`s, declared here beside `OfferedTools` so the
  response formats need not import the parser), so there a model may still write undeclared
  keys. Past turns with assistant `tool_calls` and `role: "tool"` results go to the replica
  structured (`to_tool_call`), rendered the same way; client data stays data, never control
  tokens (engine/template.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from engine.grammar import COMPACT_JSON, Grammar, grammar_error
from engine.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall

from deployments.http.closed_schema import closed_schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _usable_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, if llguidance can compile it; ValueError saying why not otherwise."""
    error = grammar_error(Grammar.json_schema(schema))
    if error:
        raise ValueError(f"unsupported or invalid JSON schema: {error}")
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(_usable_schema)]


class JsonSchemaSpec(Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: JsonSchema = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: JsonSchema = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(Strict):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            json.loads(arguments)
        except ValueError:
            raise ValueError("arguments must be JSON text") from None
        return arguments


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_tool_call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


def response_grammar(response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> Grammar | None:
    """The grammar a `response_format` asks for, or None for free text."""
    if isinstance(response_format, JsonObjectFormat):
        return Grammar.json_schema({"type": "object"})
    if isinstance(response_format, JsonSchemaFormat):
        return Grammar.json_schema(response_format.json_schema.schema_ or {"type": "object"})
    return None


@dataclass(frozen=True)
class OfferedTools:
    """What a reply's tool calls are read against: the functions it may call, and whether a
    grammar forces it to be one call from its first token (`required` or a named function)."""

    names: tuple[str, ...]
    forced: bool


@dataclass(frozen=True)
class ParsedToolCall:
    """A tool call read back out of a reply (tool_calls.py)."""

    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def offered_tools(tools: list[ToolDef] | None, choice: ToolChoice) -> OfferedTools | None:
    """The functions a reply may call under `choice` (None when it may call none)."""
    if not tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        return OfferedTools((choice.function.name,), forced=True)
    return OfferedTools(tuple(t.function.name for t in tools), forced=choice == "required")


def tool_call_grammar(tools: list[ToolDef], choice: ToolChoice) -> Grammar | None:
    """For `required` or a named function: exactly one call of an offered function, its
    arguments following the function's parameters schema closed (`closed_schema`), so the call
    ends after the declared properties."""
    if choice in ("none", "auto"):
        return None
    names = {t.function.name for t in tools}
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        tools = [t for t in tools if t.function.name == choice.function.name]
    calls = [{
        "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": {"const": t.function.name}, "arguments": closed_schema(t.function.parameters)},
    } for t in tools]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": COMPACT_JSON}
    lark = f'start: "{TOOL_CALL_OPEN}\\n" call "\\n{TOOL_CALL_CLOSE}"\ncall: %json {json.dumps(schema)}\n'
    return Grammar(kind="lark", source=lark)


def tool_dicts(tools: list[ToolDef]) -> list[dict[str, Any]]:
    """The tools as the replica's prompt builder takes them (JSON-like, unset fields left out)."""
    return [t.model_dump(exclude_none=True) for t in tools]
