"""The engine's TokenLogprobs in OpenAI's two logprobs shapes (models in openai_format.py).

Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of the
N most likely tokens per position) and `text_offset` (where each token's text starts in the
choice's text, counted from `offset`); with `echo`, the prompt's tokens come first and the first
one's logprob and top list are null.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.request import TokenLogprob

from deployments.http.openai_format import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
            top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for _, t, v in e.top],
        )
        for e in entries
    ])


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else {t: v for _, t, v in e.top} for e in entries],
        text_offset=offsets,
    )

