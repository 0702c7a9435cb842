"""What goes into the engine (GenerationRequest) and what comes out: a request's stream is its
choices' Deltas, then one RequestEnd (how the request ended, with its RequestStats)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from engine.config import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]
FAILED_FINISHES: frozenset[FinishReason] = frozenset({"error", "cancelled"})
"""A choice that finished so failed, and so did its request: the one definition, read through
`Delta.failed` and `RequestEnd.failed`."""


@dataclass
class TokenLogprob:
    """One token's logprob and the most likely tokens at its position (most likely first);
    a prompt's first token has none (None)."""

    token_id: int
    token: str
    logprob: float | None
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, token, logprob)


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerationRequest:
    """One prompt to complete. `adapter` None means the base model."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    request_id: str = field(default_factory=new_request_id)
    extra_stop: list[str] = field(default_factory=list)
    dropped_messages: int = 0
    tenant: str | None = None  # who asked (an API key's id): fair share counts per adapter and tenant
    adapter_load_s: float = 0.0  # seconds the caller waited for the adapter before submitting (cold start)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.params.stop) + [s for s in self.extra_stop if s not in self.params.stop]


@dataclass
class CheckedRequest(GenerationRequest):
    """A request made by `Engine.chat_request` / `completion_request`, which checked its limits
    (`Engine.check_limits`): `submit` does not check them again. Change its prompt or params
    and it is no longer checked (make a plain GenerationRequest instead)."""


@dataclass
class RequestStats:
    """Numbers about one finished request; times in seconds."""

    prompt_tokens: int
    completion_tokens: int
    dropped_messages: int
    latency: float
    time_to_first_token: float | None
    tokens_per_second: float | None
    stop_reason: str | None = None  # a guard that stopped the row ("repetition"), beyond finish_reason
    adapter_load_s: float = 0.0  # of latency and time_to_first_token: waiting for the adapter's load (0: warm)
    # From the first token to the first visible text (held back as part of a UTF-8 character or a
    # possible stop string); None when no text was released. TTFT as a user sees it is the sum.
    first_text_held_s: float | None = None
    cached_prompt_tokens: int = 0  # of prompt_tokens: found in the prefix cache, not computed
    queue_s: float | None = None  # arrival -> admission (KV blocks given), of time_to_first_token


@dataclass
class Delta:
    """A piece of one choice's output (`index`; a request has `params.n` choices). A choice's
    last delta has finish_reason and stats set. `logprobs` (when asked) score `token_ids`, one
    each; a choice's first delta carries its prompt's length (`prompt_tokens`, and of it
    `cached_prompt_tokens`: for usage in every chunk), and its prompt's text (`echo`) and
    logprobs when asked."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    stats: RequestStats | None = None
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_text: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int | None = None  # the prompt's length, on a choice's first delta
    cached_prompt_tokens: int | None = None  # of those, found in the prefix cache (first delta too)

    def merge(self, later: Delta) -> Delta:
        """This delta followed by `later` (of the same choice), as one."""
        logprobs = None if self.logprobs is None and later.logprobs is None else (
            (self.logprobs or []) + (later.logprobs or [])
        )
        return Delta(
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            finish_reason=later.finish_reason,
            error=later.error,
            stats=later.stats,
            index=self.index,
            logprobs=logprobs,
            prompt_text=self.prompt_text if self.prompt_text is not None else later.prompt_text,
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            prompt_tokens=self.prompt_tokens if self.prompt_tokens is not None else later.prompt_tokens,
            cached_prompt_tokens=(self.cached_prompt_tokens if self.cached_prompt_tokens is not None
                                  else later.cached_prompt_tokens),
        )

    @property
    def failed(self) -> bool:
        """This is its choice's last delta, and the choice failed (FAILED_FINISHES)."""
        return self.finish_reason in FAILED_FINISHES


@dataclass(frozen=True)
class ChoiceEnd:
    """How one choice ended: its finish reason and, when a guard stopped it, why."""

    index: int
    finish_reason: FinishReason
    stop_reason: str | None = None


@dataclass
class RequestEnd:
    """The last item of a request's stream, after every choice's last delta: how the request
    ended. `choices` by index. `stats`: the request's numbers, usage as OpenAI counts it (the
    prompt once, completion tokens summed over the choices), latency the longest, the rest the
    first choice to end's (None only when no last delta had stats: never from the engine).
    `error`: the first failed choice's message."""

    choices: list[ChoiceEnd]
    stats: RequestStats | None
    error: str | None = None

    @classmethod
    def of(cls, lasts: Sequence[Delta]) -> RequestEnd:
        """The end that follows these last deltas of a request's choices, in the order they came."""
        known = [delta.stats for delta in lasts if delta.stats is not None]
        stats = dataclasses.replace(
            known[0], completion_tokens=sum(s.completion_tokens for s in known), latency=max(s.latency for s in known),
        ) if known else None
        choices = [ChoiceEnd(d.index, d.finish_reason, d.stats.stop_reason if d.stats else None)
                   for d in sorted(lasts, key=lambda d: d.index)]
        error = next((d.error for d in lasts if d.failed and d.error), None)
        return cls(choices, stats, error)

    @property
    def failed(self) -> bool:
        """A choice failed (FAILED_FINISHES), so the request did."""
        return any(choice.finish_reason in FAILED_FINISHES for choice in self.choices)


RequestOutput = Delta | RequestEnd
"""What a request's stream yields: its choices' deltas, then its end."""
