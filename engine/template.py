"""Chat templates encoded so that only the template itself emits control tokens.

Message content is data: `<|im_end|>` typed by a user must reach the model as the characters
it is made of, never as the control token that ends a turn (or a forged system turn after it).
The template is rendered with a placeholder for each message's content; the special tokens
found in the template's own text become control tokens, and the text between two of them
(template text and content alike) is tokenized in one piece with special tokens split. A
tokenizer does the same between two special tokens, so for content without special-token text
the ids equal `tokenizer(apply_chat_template(...), add_special_tokens=False)` exactly.

Templates may trim content (`| trim`, `.strip()`): the placeholder carries the content's
leading and trailing whitespace, so trimmed or not, the prompt is the template's own.
Other rewrites of content inside a template are not reproduced.

Tools (their JSON schemas), assistant `tool_calls` (names, ids, arguments) and a tool result's
`tool_call_id` are client data too, but templates render them piece by piece (`tojson`, string
by string), so they get no whole placeholder: instead each special token's text inside one of
their strings is replaced by a marker before rendering, and the marker comes back as content
(the token's characters, never the control token). A template whose `tojson` escaped non-ASCII
would show the marker's escape instead: garbled, still no control token.
A message with empty content is passed as it is (templates test `if message.content`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # a type only: the HTTP ingress and the chat page run without transformers
    from transformers import PreTrainedTokenizerBase

_MARK = "\ue000{}\ue001"  # private-use characters around a message index
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_SPECIAL_MARK = "\ue002{}\ue003"  # private-use characters around a special token's index
_ANY_MARK_RE = re.compile("(\ue000\\d+\ue001|\ue002\\d+\ue003)")


class Call(Protocol):
    id: str
    name: str
    arguments: str  # JSON text

    def template_form(self) -> dict[str, Any]: ...


class Message(Protocol):
    role: str
    content: str
    tool_calls: Sequence[Call]
    tool_call_id: str | None


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt: template text, or a message's content."""

    text: str
    content: bool


class TemplateEncoder:
    """Encodes chat messages with the tokenizer's chat template; specials only from the template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len)
        self.specials = re.compile("|".join(re.escape(s) for s in reversed(specials))) if specials else None

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        """Token ids of the rendered conversation (offering `tools`, through the template's own
        tool support), ending with the generation prompt (if asked)."""
        segments = render_segments(self.tokenizer, messages, add_generation_prompt, tools, self.special_texts())
        runs, controls = self._split(segments)
        encoded = self.tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = list(encoded[0])
        for token, run in zip(controls, encoded[1:]):
            ids.append(self.tokenizer.convert_tokens_to_ids(token))
            ids.extend(run)
        return ids

    def special_texts(self) -> list[str]:
        """The special tokens' texts, longest first (as the splitting regex tries them)."""
        return sorted((t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special),
                      key=len, reverse=True)

    def _split(self, segments: Sequence[Segment]) -> tuple[list[str], list[str]]:
        """The texts between the template's special tokens (one more than there are tokens)."""
        runs: list[list[str]] = [[]]
        controls: list[str] = []
        for segment in segments:
            pos = 0
            if not segment.content and self.specials:
                for match in self.specials.finditer(segment.text):
                    runs[-1].append(segment.text[pos : match.start()])
                    controls.append(match.group())
                    runs.append([])
                    pos = match.end()
            runs[-1].append(segment.text[pos:])
        return ["".join(run) for run in runs], controls


def render_segments(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                    add_generation_prompt: bool = True, tools: Sequence[dict[str, Any]] = (),
                    specials: Sequence[str] = ()) -> list[Segment]:
    """The chat template's rendering, cut into template text and client data, in order.

    `specials` (longest first) are masked in tools, tool calls and tool_call_ids (module docstring)."""
    cores, marked = [], []
    for i, message in enumerate(messages):
        lead, core, trail = _split_whitespace(message.content)
        cores.append(core)
        marked.append(_marked_message(message, lead + _MARK.format(i) + trail if core else message.content, specials))
    rendered = tokenizer.apply_chat_template(marked, tools=_masked(list(tools), specials) or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    parts = _ANY_MARK_RE.split(rendered)  # template text, marker, template text, marker, ...
    segments = [Segment(parts[0], False)]
    for mark, text in zip(parts[1::2], parts[2::2]):
        index = int(mark[1:-1])
        data = cores[index] if mark[0] == "\ue000" else specials[index]
        segments += [Segment(data, True), Segment(text, False)]
    return segments


def _marked_message(message: Message, content: str, specials: Sequence[str]) -> dict[str, Any]:
    """The message as the template gets it: content as given, tool fields structured and masked."""
    marked: dict[str, Any] = {"role": message.role, "content": content}
    if getattr(message, "tool_calls", ()):
        marked["tool_calls"] = _masked([call.template_form() for call in message.tool_calls], specials)
    if getattr(message, "tool_call_id", None):
        marked["tool_call_id"] = _masked(message.tool_call_id, specials)
    return marked


def _masked(value: Any, specials: Sequence[str]) -> Any:
    """`value` with every special token's text in its strings (keys too) replaced by a marker."""
    if isinstance(value, str):
        for index, special in enumerate(specials):
            value = value.replace(special, _SPECIAL_MARK.format(index))
        return value
    if isinstance(value, dict):
        return {_masked(k, specials): _masked(v, specials) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, specials) for v in value]
    return value


def _split_whitespace(text: str) -> tuple[str, str, str]:
    """(leading whitespace, the rest without trailing whitespace, trailing whitespace)."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = len(text) - len(text.lstrip())
    return text[:start], core, text[start + len(core) :]
