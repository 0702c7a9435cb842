"""A step's third move: what its forward pass becomes (rows advanced, tokens sampled, deltas).

`Postprocessor.process(chunks, out)`, after the runner's forward pass over `chunks`:

1. each chunk's row counts its tokens as computed (`num_computed`), and the block manager keys
   the blocks they filled for the prefix cache (engine/blocks.py, `register_computed`);
2. the prompt tokens the runner kept logits for get their logprobs (engine/logprobs.py);
3. each sampling row gets its next token (engine/sampling.py) and, when asked, its logprobs,
   from the row's logits as the model gave them (a copy taken before the sampler changes
   them); `Row.advance` turns the token into the row's delta (detokenizing, stop strings,
   limits); a row's first delta carries its prompt's text and logprobs when asked;
4. a row whose delta has a finish reason is retired: the scheduler takes it out and its
   blocks go back to the block manager.

`finish` ends rows the same way outside a pass (cancelled, forward pass failed, shutdown).
Contract: every `Event` is `(request id, Delta)`; a row's last delta has its finish reason,
and by the time it is returned the row's blocks are given back. A row whose logits are not
finite, or whose detokenizing fails, finishes with an error alone; the other rows go on.

Thread: the engine core's (its worker thread), inside `EngineCore.step()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from engine.logprobs import LogprobMaker
from engine.request import TokenLogprob
from engine.request import Delta, FinishReason
from engine.row import Row
from engine.runner import StepLogits
from engine.sampling import sample_next_tokens
from engine.scheduler import ScheduledChunk, Scheduler

log = logging.getLogger(__name__)

Event = tuple[str, Delta]
"""(request id, delta): what a step emits."""


class Postprocessor:
    """Turns a step's logits into its rows' deltas and retires the rows that finish."""

    def __init__(self, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase):
        self.scheduler = scheduler
        self.logprobs = LogprobMaker(tokenizer)
        self.finished_requests = 0  # rows finished since start (one per choice)
        self.generated_tokens = 0  # tokens sent in deltas since start

    def process(self, chunks: list[ScheduledChunk], out: StepLogits) -> list[Event]:
        """The events of a forward pass over `chunks` whose kept logits are `out`."""
        for chunk in chunks:
            chunk.row.num_computed = chunk.start + chunk.length
            self.scheduler.blocks.register_computed(chunk.row)
        if out.prompt_spans:
            self._score_prompts(out)
        return self._sample(out.rows, out.logits)

    def finish(self, rows: Iterable[Row], reason: FinishReason, error: str | None = None) -> list[Event]:
        """End each row now with `reason` (and `error`): its last delta, its blocks given back."""
        return [self._finish(row, reason, error) for row in rows]

    def _score_prompts(self, out: StepLogits) -> None:
        """Append the logprobs of the prompt tokens this step scored to their rows."""
        first = 0
        for span in out.prompt_spans:
            row = span.row
            prompt = row.request.prompt_ids
            chosen = prompt[span.first + 1 : span.first + 1 + span.count]
            logits = out.prompt_logits[first : first + span.count]
            top = [row.request.params.prompt_logprobs] * span.count
            row.prompt_logprobs += self.logprobs.entries(logits, chosen, top)
            first += span.count

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[Event]:
        """Each sampling row's next token, turned into its delta; a row's error is its own."""
        if not rows:
            return []
        scoring = [i for i, row in enumerate(rows) if row.request.params.logprobs is not None]
        scored = logits[scoring].float() if scoring else None  # a copy: the sampler changes `logits`
        tokens = sample_next_tokens(logits, [r.sampler for r in rows])
        logprobs = self._token_logprobs(rows, scoring, scored, tokens) if scoring else {}
        events = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            try:
                if token is None:
                    raise ValueError("the model produced non-finite logits (NaN or inf) for this request")
                delta = row.advance(token)
                if i in logprobs and delta.token_ids:
                    delta.logprobs = [logprobs[i]]
                if len(row.sampler.output_ids) == 1:
                    self._attach_prompt(row, delta)
            except Exception as err:
                log.warning("request %s failed: %s", row.request_id, err)
                events.append(self._finish(row, "error", error=str(err)))
                continue
            self.generated_tokens += len(delta.token_ids)
            if delta.finish_reason:
                self._retire(row)
            events.append((row.request_id, delta))
        return events

    def _token_logprobs(self, rows: list[Row], scoring: list[int], logits: torch.Tensor,
                        tokens: list[int | None]) -> dict[int, TokenLogprob]:
        """Logprobs of the sampled tokens of rows `scoring` (indexes into `rows`), by index."""
        kept = [(j, i) for j, i in enumerate(scoring) if tokens[i] is not None]
        if not kept:
            return {}
        entries = self.logprobs.entries(
            logits[[j for j, _ in kept]], [tokens[i] for _, i in kept], [rows[i].request.params.logprobs for _, i in kept]
        )
        return {i: entry for (_, i), entry in zip(kept, entries)}

    def _attach_prompt(self, row: Row, delta: Delta) -> None:
        """A choice's first delta carries its prompt's text and logprobs, when asked."""
        params = row.request.params
        if params.echo:
            delta.prompt_text = self.logprobs.text(row.request.prompt_ids)
        if row.prompt_logprobs is not None:  # the first token has no logprob (nothing before it)
            first = row.request.prompt_ids[0]
            delta.prompt_logprobs = [TokenLogprob(first, self.logprobs.token(first), None)] + row.prompt_logprobs[1:]

    def _finish(self, row: Row, reason: FinishReason, error: str | None = None) -> Event:
        delta = row.finish(reason, error=error)
        self._retire(row)
        return row.request_id, delta

    def _retire(self, row: Row) -> None:
        self.scheduler.remove(row)
        self.finished_requests += 1
