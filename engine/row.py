"""One request inside the engine: its sampler, detokenizer, stop matcher, output queue, timing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from engine.detok import IncrementalDetokenizer, StopMatcher
from engine.request import Delta, FinishReason, GenerationRequest, RequestStats
from engine.sampling import RowSampler


@dataclass
class Row:
    """A request's state while it waits or runs. Its deltas go to `queue` on the caller's loop."""

    request: GenerationRequest
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    queue: asyncio.Queue[Delta]
    eos_ids: frozenset[int]
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    next_id: int | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    timeout_s: float | None = None

    @classmethod
    def create(
        cls,
        request: GenerationRequest,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        max_newlines: int,
        device: torch.device,
        timeout_s: float | None = None,
    ) -> Row:
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= eos_ids
        return cls(
            request=request,
            sampler=RowSampler.create(params, request.prompt_ids, device),
            detok=IncrementalDetokenizer(tokenizer),
            stops=StopMatcher(request.stop_strings, max_newlines),
            queue=asyncio.Queue(),
            eos_ids=frozenset(stop_ids),
            timeout_s=timeout_s,
        )

    @property
    def reservation(self) -> int:
        """KV tokens this row may need at most: prompt plus every token it may generate."""
        return len(self.request.prompt_ids) + self.request.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(self, token: int) -> Delta:
        """Take the row's next token; return what the client sees of it."""
        now = time.monotonic()
        self.first_token_at = self.first_token_at or now
        self.sampler.output_ids.append(token)
        self.next_id = token
        if token in self.eos_ids:
            return self.finish("stop", self._flush())
        text, stop = self.stops.feed(self.detok.add(token))
        if stop:
            return self.finish("stop", text, [token])
        if len(self.sampler.output_ids) >= self.request.params.max_tokens or self._late(now):
            return self.finish("length", text + self._flush(), [token])
        return Delta(text=text, token_ids=[token])

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
        return Delta(
            text=text, token_ids=token_ids or [], finish_reason=reason, error=error, stats=self.stats()
        )

    def stats(self) -> RequestStats:
        now = time.monotonic()
        completion = len(self.sampler.output_ids)
        ttft = self.first_token_at - self.arrival if self.first_token_at else None
        decode_time = now - self.first_token_at if self.first_token_at else 0.0
        return RequestStats(
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=completion,
            dropped_messages=self.request.dropped_messages,
            latency=now - self.arrival,
            time_to_first_token=ttft,
            tokens_per_second=(completion - 1) / decode_time if completion > 1 and decode_time else None,
        )
