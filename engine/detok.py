"""Incremental detokenization and stop strings.

Text is released only once it is final: a token that ends inside a multi-byte UTF-8
character is held until the character completes, and text that could be the start of a
stop string is held until it is known not to be one. So a stop string is never emitted,
not even partly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (from `prefix` on) so that tokenizers that drop a leading space
    or merge bytes across tokens still produce exactly the text of decoding everything.
    """

    tokenizer: PreTrainedTokenizerBase
    tokens: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the newly final text (maybe empty)."""
        self.tokens.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before) :]

    def flush(self) -> str:
        """Text still held at the end (an incomplete character decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.tokens)
        return after[len(before) :]


@dataclass
class StopMatcher:
    """Holds back text that may begin a stop string; reports when one is complete.

    Work per `feed` is linear in the new text: a stop string that completes now must end in
    the new text, so only the last `len(text) + longest - 1` characters are searched; the held
    suffix is found by trying positions from the left, and a position that fails is released,
    so each character is tried once (a set lookup) plus one try per feed.

    Also stops after `max_newlines` consecutive newlines (blank-only whitespace between them
    counts as part of the run); 0 disables that guard.
    """

    stop: Sequence[str]
    max_newlines: int = 0
    pending: str = ""
    newline_run: int = 0
    longest: int = field(init=False)
    prefixes: frozenset[str] = field(init=False)  # every proper prefix of every stop string

    def __post_init__(self) -> None:
        self.longest = max(map(len, self.stop), default=0)
        self.prefixes = frozenset(s[:n] for s in self.stop for n in range(1, len(s)))

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether generation must stop)."""
        self.pending += text
        cut = self._first_stop(len(text))
        if cut is not None:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = self._held_suffix_length()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, self._too_many_newlines(text)

    def flush(self) -> str:
        """The held-back text, released when generation ends for another reason."""
        out, self.pending = self.pending, ""
        return out

    def _first_stop(self, new: int) -> int | None:
        """Where the earliest-starting stop string that ends in the new text begins."""
        start = max(0, len(self.pending) - new - self.longest + 1)
        hits = [i for i in (self.pending.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix_length(self) -> int:
        """Length of the longest end of `pending` that is a proper prefix of a stop string."""
        for i in range(max(0, len(self.pending) - self.longest + 1), len(self.pending)):
            if self.pending[i:] in self.prefixes:
                return len(self.pending) - i
        return 0

    def _too_many_newlines(self, text: str) -> bool:
        if not self.max_newlines:
            return False
        for char in text:
            if char == "\n":
                self.newline_run += 1
            elif not char.isspace():
                self.newline_run = 0
        return self.newline_run >= self.max_newlines
