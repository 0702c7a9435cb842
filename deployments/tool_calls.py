"""Tool calls read back out of a reply (Hermes format: `<tool_call>{json}</tool_call>`).

`ToolCallSplitter` takes a reply piece by piece: text before the first `<tool_call>` is
content and streams at once (only a piece that may begin the tag waits); from the tag on,
the text is held to the end of the reply, then parsed into calls. A reply whose held text
holds no well-formed call gives that text back as content. `with_tool_calls` applies it to a
request's item stream: content deltas as they come, and the calls on the last delta
(`ToolCallDelta`, finish_reason "tool_calls").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from engine.request import Delta

from deployments.service import FAILED_FINISHES, Item
from deployments.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolCallDelta(Delta):
    """A reply's last delta, carrying the tool calls found in it."""

    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def parse_tool_calls(text: str) -> list[ParsedToolCall] | None:
    """The calls in `text` (from its first tag on), or None unless every one is well formed."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        arguments = body.get("arguments", body.get("parameters", {}))
        calls.append(ParsedToolCall(body["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


class ToolCallSplitter:
    """Content streams; tool calls are held and parsed at the end (see the module docstring)."""

    def __init__(self) -> None:
        self.held = ""
        self.in_calls = False

    def feed(self, text: str) -> str:
        """The content that can go out now."""
        text = self.held + text
        if self.in_calls:
            self.held = text
            return ""
        start = text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self.in_calls, self.held = True, text[start:]
            return text[:start]
        keep = next((n for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1)
                     if TOOL_CALL_OPEN.startswith(text[-n:])), 0)
        self.held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """(the content still held, the calls) at the end of the reply."""
        calls = parse_tool_calls(self.held) if self.in_calls else None
        held, self.held = self.held, ""
        return ("", calls) if calls else (held, [])


async def with_tool_calls(items: AsyncIterator[Item]) -> AsyncIterator[Item]:
    """The items with tool calls taken out of the text and put on each choice's last delta
    (one splitter per choice `index`, for n > 1)."""
    splitters: dict[int, ToolCallSplitter] = {}
    async with aclosing(items):
        async for item in items:
            if not isinstance(item, Delta):
                yield item
                continue
            splitter = splitters.setdefault(item.index, ToolCallSplitter())
            text = splitter.feed(item.text)
            if not item.finish_reason or item.finish_reason in FAILED_FINISHES:
                yield replace(item, text=text)
                continue
            rest, calls = splitter.finish()
            finish = "tool_calls" if calls else item.finish_reason
            yield ToolCallDelta(**{**vars(item), "text": text + rest, "finish_reason": finish}, tool_calls=calls)
