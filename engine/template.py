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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

_MARK = "\ue000{}\ue001"  # private-use characters around a message index
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


class Message(Protocol):
    role: str
    content: str


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

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation, ending with the generation prompt (if asked)."""
        runs, controls = self._split(render_segments(self.tokenizer, messages, add_generation_prompt))
        encoded = self.tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = list(encoded[0])
        for token, run in zip(controls, encoded[1:]):
            ids.append(self.tokenizer.convert_tokens_to_ids(token))
            ids.extend(run)
        return ids

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
                    add_generation_prompt: bool = True) -> list[Segment]:
    """The chat template's rendering, cut into template text and message content, in order."""
    cores, marked = [], []
    for i, message in enumerate(messages):
        lead, core, trail = _split_whitespace(message.content)
        cores.append(core)
        marked.append({"role": message.role, "content": lead + _MARK.format(i) + trail})
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = _MARK_RE.split(rendered)  # template text, index, template text, index, ...
    segments = [Segment(parts[0], False)]
    for index, text in zip(parts[1::2], parts[2::2]):
        segments += [Segment(cores[int(index)], True), Segment(text, False)]
    return segments


def _split_whitespace(text: str) -> tuple[str, str, str]:
    """(leading whitespace, the rest without trailing whitespace, trailing whitespace)."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = len(text) - len(text.lstrip())
    return text[:start], core, text[start + len(core) :]
