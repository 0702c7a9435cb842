"""What the API (api.py) has of one response's choices (n >= 1) as their deltas arrive: one
buffer per choice.

A request with n choices gets one delta stream whose deltas carry their choice's `index`; each
choice ends with its own last delta (its finish reason and stats, for the choice's finish chunk),
and the request with its ReplyEnd (deployments/contract/replies.py: the usage, whether it
failed), which the caller reads: nothing here decides that the response is over.
`ChoiceBuffers` turns each delta into what the client sees of it (its text, with the echoed
prompt before a choice's first text, and its logprobs in the endpoint's shape) and collects
whole choices for a non-streaming response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import TokenLogprob
from engine.request import Delta

from deployments.http.logprob_format import chat_logprobs, completion_logprobs
from deployments.http.openai_format import (
    ChatLogprobs,
    ChoiceOutput,
    CompletionLogprobs,
    Kind,
    PromptTokensDetails,
    Usage,
)
from deployments.http.tool_calls import tool_calls_of


@dataclass
class Piece:
    """What the client sees of one delta: its text and the logprobs of its tokens."""

    text: str
    logprobs: ChatLogprobs | CompletionLogprobs | None


@dataclass
class ChoiceBuffer:
    """One choice's text, logprob entries and last delta so far."""

    text: str = ""
    entries: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # characters of the tokens already shown (completions' text_offset)
    tokens: int = 0  # completion tokens so far
    last: Delta | None = None


class ChoiceBuffers:
    """The buffers (`per_choice`, by index) of one response of `kind`, for `n` choices."""

    def __init__(self, kind: Kind, n: int, logprobs: bool):
        self.kind, self.logprobs = kind, logprobs
        self.per_choice = [ChoiceBuffer() for _ in range(n)]
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def collect(self, delta: Delta) -> tuple[str, list[TokenLogprob]]:
        """Add a delta to its choice; return its text (echoed prompt first) and logprobs."""
        state = self.per_choice[delta.index]
        text = (delta.prompt_text or "") + delta.text
        entries = (delta.prompt_logprobs or []) + (delta.logprobs or []) if self.logprobs else []
        state.text += text
        state.entries += entries
        state.tokens += len(delta.token_ids)
        self.note_prompt(delta)
        return text, entries

    def note_prompt(self, delta: Delta) -> None:
        """Take the prompt's token counts from a choice's first delta (later ones carry none)."""
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        self.cached_tokens = delta.cached_prompt_tokens or self.cached_tokens

    def usage_so_far(self, index: int) -> Usage:
        """vLLM's continuous usage of choice `index`: the prompt, and the choice's tokens so far
        (its final count once it has ended)."""
        state = self.per_choice[index]
        stats = state.last.stats if state.last else None
        if stats is not None:
            return Usage.of(stats)
        prompt, completion = self.prompt_tokens, state.tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    def piece(self, delta: Delta) -> Piece:
        """The delta as the client sees it in a stream."""
        text, entries = self.collect(delta)
        return Piece(text, self._format(entries, self.per_choice[delta.index]) if entries else None)

    def end_choice(self, last: Delta) -> None:
        """Record a choice's last delta (after its text was collected): its finish for `outputs`,
        its final token count for `usage_so_far`."""
        self.per_choice[last.index].last = last

    def outputs(self) -> list[ChoiceOutput]:
        """The whole choices (for a non-streaming response), by index."""
        outputs = []
        for index, state in enumerate(self.per_choice):
            last = state.last
            logprobs = self._format(state.entries, ChoiceBuffer()) if self.logprobs else None
            outputs.append(ChoiceOutput(
                index=index, text=state.text, finish_reason=last.finish_reason if last else "length",
                stop_reason=last.stats.stop_reason if last and last.stats else None, logprobs=logprobs,
                tool_calls=(tool_calls_of(last) if last else None) or None,
            ))
        return outputs

    def _format(self, entries: list[TokenLogprob], state: ChoiceBuffer) -> ChatLogprobs | CompletionLogprobs:
        if self.kind == "chat":
            return chat_logprobs(entries)
        formatted = completion_logprobs(entries, state.offset)
        state.offset += sum(len(e.token) for e in entries)
        return formatted
