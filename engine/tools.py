"""Tools in the prompt: the chat template's own tool support, or Hermes-style text.

The per-template rule (`native_tools`): a chat template that references `tools` and whose own
call format is Hermes' (its text contains `<tool_call>`, as Qwen2.5's and Qwen3's do) renders
the tools, assistant `tool_calls` and `role: "tool"` results itself (transformers'
`apply_chat_template(..., tools=...)` with the structured messages). Every other template
(none of its own, like the built-in SmolLM2's; or another native call format, like Llama 3.1's
bare JSON or Mistral's `[TOOL_CALLS]`, whose parsers we do not have) and the Alpaca format get
Hermes text instead (engine/prompt.py `hermes_messages`): the tools as `<tools>` JSON in the system prompt,
calls as `<tool_call>` text in the assistant turn, results as `<tool_response>` in a user turn.
Either way the model's call format is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
the one the reply parser (deployments/http/tool_calls.py) and the forced-call grammar
(deployments/http/structured.py) expect.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PROMPT = (
    "You may call one or more functions to help with the user's request. The functions are "
    "described in JSON Schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


@dataclass(frozen=True)
class ToolCall:
    """A past assistant turn's call: the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def template_form(self) -> dict[str, Any]:
        """The call as chat templates expect it (arguments as an object, not text)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.loads(self.arguments)}}

    def hermes_text(self) -> str:
        body = {"name": self.name, "arguments": json.loads(self.arguments)}
        return f"{TOOL_CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def native_tools(chat_template: str | None) -> bool:
    """Whether a template renders tools itself in the Hermes call format (the module's rule)."""
    return bool(chat_template) and "tools" in chat_template and TOOL_CALL_OPEN in chat_template


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The Hermes tools prompt: one compact JSON line per tool."""
    lines = (json.dumps(tool, ensure_ascii=False, separators=(",", ":")) for tool in tools)
    return TOOLS_PROMPT.format(tools="\n".join(lines))
