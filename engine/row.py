"""One request inside the engine: its tokens, KV blocks, sampler, detokenizer, stop matcher, timing.

`tokens` are the prompt followed by every token sampled so far; the first `num_computed` of
them have their keys and values in the KV cache, in the blocks of `table`. A decoding row has
exactly one token not yet computed (the last one sampled); a row being prefilled has more.
A preempted row gives its blocks back and starts again from `num_computed = 0` (its sampled
tokens stay, so it resumes where it stopped). `block_keys` are the prefix keys of its full,
computed blocks, each chained to the one before (engine/blocks.py).

A request with `n` choices has one row per choice (`choice`); the rows of choices 1..n-1 are
forks of choice 0's row (`parent`): they wait until it has computed the prompt, then hold its
prompt blocks (reference counts) instead of computing them again (engine/scheduler.py). A fork
samples with `seed + choice`, so a seeded request gives n different but reproducible choices.
`prompt_logprobs` collects the prompt's logprobs (engine/logprobs.py), shared by the forks.

Thread: owned by the engine core (its worker thread); only `cancelled` is set from outside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from engine.config import RepetitionGuardConfig
from engine.constraints import TokenConstraint
from engine.detok import IncrementalDetokenizer, StopMatcher
from engine.kv_cache import BlockTable
from engine.request import TokenLogprob
from engine.repetition import RepetitionGuard
from engine.request import Delta, FinishReason, GenerationRequest, RequestStats
from engine.sampling import RowSampler

log = logging.getLogger(__name__)


@dataclass(eq=False)  # rows are compared by identity (list membership, removal)
class Row:
    """A request's state while it waits or runs."""

    request: GenerationRequest
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    eos_ids: frozenset[int]
    repetition: RepetitionGuard = field(default_factory=RepetitionGuard)
    adapter_identity: bytes = b""
    table: BlockTable = field(default_factory=BlockTable)
    block_keys: list[bytes] = field(default_factory=list)
    num_computed: int = 0
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # first admission (KV blocks given); a preemption keeps it
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at that admission
    first_token_at: float | None = None
    first_text_at: float | None = None  # when the first visible text was released (see advance)
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    cancelled: bool = False
    timeout_s: float | None = None
    choice: int = 0
    parent: Row | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    delivered: bool = False  # a delta has been made (the first carries the prompt's length)

    @classmethod
    def create(
        cls,
        request: GenerationRequest,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        max_newlines: int,
        device: torch.device,
        timeout_s: float | None = None,
        adapter_identity: bytes = b"",
        repetition: RepetitionGuardConfig | None = None,
        choice: int = 0,
        parent: Row | None = None,
        constraint: TokenConstraint | None = None,
    ) -> Row:
        """Choice `choice` of the request; `parent` is choice 0's row for the others."""
        params = request.params
        if choice and params.seed is not None:
            params = params.model_copy(update={"seed": params.seed + choice})
        stop_ids = set(params.stop_token_ids)
        guard = repetition or RepetitionGuardConfig()
        if not params.ignore_eos:
            stop_ids |= eos_ids
        else:  # a request for exactly max_tokens (benchmarks) is not cut for repeating itself
            guard = guard.model_copy(update={"min_repeats": 0})
        return cls(
            request=request,
            sampler=RowSampler.create(params, request.prompt_ids, device, constraint),
            detok=IncrementalDetokenizer(tokenizer),
            stops=StopMatcher(request.stop_strings, max_newlines),
            eos_ids=frozenset(stop_ids),
            repetition=RepetitionGuard(guard),
            adapter_identity=adapter_identity,
            timeout_s=timeout_s,
            choice=choice,
            parent=parent,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    @property
    def scoring_prompt(self) -> bool:
        """True while the row still needs logprobs of prompt tokens (it then skips the prefix cache)."""
        scored = self.prompt_logprobs
        return scored is not None and len(scored) < len(self.request.prompt_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        """The prompt and every token sampled so far."""
        return self.request.prompt_ids + self.sampler.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.sampler.output_ids)

    def token_range(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop] without building the whole list."""
        prompt = self.request.prompt_ids
        if start >= len(prompt):
            return self.sampler.output_ids[start - len(prompt) : stop - len(prompt)]
        return prompt[start:stop] + self.sampler.output_ids[: max(stop - len(prompt), 0)]

    @property
    def decoding(self) -> bool:
        """True when only the last sampled token is missing from the cache."""
        return self.num_computed == self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(self, token: int) -> Delta:
        """Take the row's next token; return what the client sees of it. The text of a token can
        be held back (part of a UTF-8 character, maybe the start of a stop string): the first
        delta with text sets `first_text_at`, the time to first token as a user sees it."""
        now = time.monotonic()
        self.first_token_at = self.first_token_at or now
        delta = self._take(token, now)
        if delta.text and self.first_text_at is None:
            self.first_text_at = now
        return delta

    def _take(self, token: int, now: float) -> Delta:
        self.sampler.output_ids.append(token)
        if token in self.eos_ids:
            return self.finish("stop", self._flush())
        text, stop = self.stops.feed(self.detok.add(token))
        if stop:
            return self.finish("stop", text, [token])
        if self.sampler.constraint_done:  # the grammar is complete (or took an ignored EOS)
            return self.finish("stop", text + self._flush(), [token])
        if self.repetition.feed(token):
            period, repeats = self.repetition.loop
            log.info("request %s stopped: %d tokens repeated %d times", self.request_id, period, repeats)
            self.stop_reason = "repetition"
            return self.finish("stop", text + self._flush(), [token])
        if len(self.sampler.output_ids) >= self.request.params.max_tokens or self._late(now):
            return self.finish("length", text + self._flush(), [token])
        return self._delta(text=text, token_ids=[token])

    def _late(self, now: float) -> bool:
        """Past the request time limit: the row stops as if it had reached max_tokens."""
        return self.timeout_s is not None and now - self.arrival > self.timeout_s

    def _flush(self) -> str:
        """Everything held back, at a finish that is not a stop string."""
        text, _ = self.stops.feed(self.detok.flush())
        return text + self.stops.flush()

    def finish(
        self, reason: FinishReason, text: str = "", token_ids: list[int] | None = None,
        error: str | None = None,
    ) -> Delta:
        """Mark the row finished; the returned delta is its last."""
        self.finish_reason = reason
        return self._delta(text=text, token_ids=token_ids or [], finish_reason=reason, error=error, stats=self.stats())

    def _delta(self, **fields) -> Delta:
        """A delta of this row's choice; the first one carries the prompt's length."""
        first, self.delivered = not self.delivered, True
        if not first:
            return Delta(index=self.choice, **fields)
        return Delta(index=self.choice, prompt_tokens=len(self.request.prompt_ids),
                     cached_prompt_tokens=self.cached_prompt_tokens, **fields)

    def stats(self) -> RequestStats:
        now = time.monotonic()
        completion = len(self.sampler.output_ids)
        loading = self.request.adapter_load_s  # before `arrival`: the caller awaited the adapter first
        ttft = self.first_token_at - self.arrival + loading if self.first_token_at else None
        text_held = self.first_text_at - self.first_token_at if self.first_text_at and self.first_token_at else None
        decode_time = now - self.first_token_at if self.first_token_at else 0.0
        return RequestStats(
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=completion,
            dropped_messages=self.request.dropped_messages,
            latency=now - self.arrival + loading,
            time_to_first_token=ttft,
            first_text_held_s=text_held,
            tokens_per_second=(completion - 1) / decode_time if completion > 1 and decode_time else None,
            stop_reason=self.stop_reason,
            adapter_load_s=loading,
            cached_prompt_tokens=self.cached_prompt_tokens,
            queue_s=self.admitted_at - self.arrival if self.admitted_at else None,
        )
