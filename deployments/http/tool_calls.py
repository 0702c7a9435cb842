"""Tool calls read back out of a reply (Hermes format: `<tool_call>{json}</tool_call>`).

`ToolCallSplitter` takes a reply piece by piece: text before the first `<tool_call>` is
content and streams at once (only a piece that may begin the tag waits); from the tag on (from
the first token when a grammar forces the call), the text is held to the end of the reply, then
parsed into calls. A finished reply whose held text holds no well-formed call gives that text
back as content. A reply cut by max_tokens (finish_reason "length") inside a call never does:
its whole calls and the last call's arguments text so far (`parse_cut_tool_calls`) are its
calls, as OpenAI returns a cut call; a call cut before its name is known is dropped (logged).
`with_tool_calls` applies it to a request's item stream: content deltas as they come, and the
calls on each choice's last delta (a `ToolCallDelta`, finish_reason "tool_calls", or "length"
when cut); readers take them with `tool_calls_of`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from engine.request import Delta

from deployments.contract.replies import Item
from deployments.http.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, OfferedTools, ParsedToolCall

logger = logging.getLogger(__name__)

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)(")?', re.DOTALL)
"""A call's start: its name, the closing quote present once the name is whole."""
_ARGUMENTS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_DECODER = json.JSONDecoder()


@dataclass
class ToolCallDelta(Delta):
    """A choice's last delta as `with_tool_calls` yields it: with the tool calls found in its reply."""

    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def tool_calls_of(last: Delta) -> list[ParsedToolCall]:
    """The tool calls of a choice whose last delta this is (none unless `with_tool_calls` found some)."""
    return last.tool_calls if isinstance(last, ToolCallDelta) else []


def parse_tool_calls(text: str) -> list[ParsedToolCall] | None:
    """The calls in `text` (from its first tag on), or None unless every one is well formed."""
    calls = [_whole_call(match.group(1)) for match in _CALL.finditer(text)]
    return calls if calls and None not in calls else None


def parse_cut_tool_calls(text: str, offered: OfferedTools) -> list[ParsedToolCall]:
    """The calls in `text` (from its first tag on, or any start of the tag when the call is
    forced) of a reply cut by max_tokens: the whole calls before the first that is not, and that
    one with its name and the arguments text written so far. Its name must be whole, or under a
    forced choice begin exactly one offered name (the grammar allows no other)."""
    bodies = [match.group(1) for match in _CALL.finditer(text)]
    if not bodies and offered.forced and TOOL_CALL_OPEN.startswith(text.strip()):
        bodies = [""]
    calls = []
    for body in bodies:
        call = _whole_call(body)
        if call is None:
            cut = _cut_call(body, offered)
            return calls + [cut] if cut else calls
        calls.append(call)
    return calls


def _whole_call(body: str) -> ParsedToolCall | None:
    """A call's JSON, if whole (a start of the closing tag may follow it)."""
    try:
        value, end = _DECODER.raw_decode(body)
    except ValueError:
        return None
    rest = body[end:].strip()
    if (rest and not TOOL_CALL_CLOSE.startswith(rest)) or not isinstance(value, dict) \
            or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _cut_call(body: str, offered: OfferedTools) -> ParsedToolCall | None:
    """A call's JSON cut short: its name and its arguments text so far (maybe empty)."""
    match = _NAME.match(body)
    if match and match.group(2):
        try:
            name = json.loads(f'"{match.group(1)}"')
        except ValueError:
            return None
        after = _ARGUMENTS.match(body, match.end())
        return ParsedToolCall(name, body[after.end():] if after else "")
    start = match.group(1) if match else ""
    names = [name for name in offered.names if name.startswith(start)] if offered.forced else []
    if len(names) != 1:
        logger.info("a tool call cut by max_tokens before its name was whole is dropped (%d characters)", len(body))
        return None
    return ParsedToolCall(names[0], "")


class ToolCallSplitter:
    """Content streams; tool calls are held and parsed at the end (see the module docstring)."""

    def __init__(self, offered: OfferedTools | None = None) -> None:
        self.offered = offered or OfferedTools((), forced=False)
        self.held = ""
        self.in_calls = self.offered.forced  # a forced call starts at the first token

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

    def finish(self, cut: bool = False) -> tuple[str, list[ParsedToolCall]]:
        """(the content still held, the calls) at the end of the reply; `cut`: by max_tokens,
        when held call text is never content (the module docstring)."""
        held, self.held = self.held, ""
        if not self.in_calls:
            return held, []
        if cut:
            return "", parse_cut_tool_calls(held, self.offered)
        calls = parse_tool_calls(held)
        return ("", calls) if calls else (held, [])


async def with_tool_calls(items: AsyncIterator[Item], offered: OfferedTools) -> AsyncIterator[Item]:
    """The items with tool calls taken out of the text and put on each choice's last delta
    (one splitter per choice `index`, for n > 1); a choice cut by max_tokens keeps its
    finish_reason "length", with its calls (the module docstring)."""
    splitters: dict[int, ToolCallSplitter] = {}
    async with aclosing(items):
        async for item in items:
            if not isinstance(item, Delta):
                yield item
                continue
            splitter = splitters.setdefault(item.index, ToolCallSplitter(offered))
            text = splitter.feed(item.text)
            if not item.finish_reason or item.failed:
                yield replace(item, text=text)
                continue
            cut = item.finish_reason == "length"
            rest, calls = splitter.finish(cut)
            finish = "tool_calls" if calls and not cut else item.finish_reason
            yield ToolCallDelta(**{**vars(item), "text": text + rest, "finish_reason": finish}, tool_calls=calls)
