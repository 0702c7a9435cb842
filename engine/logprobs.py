"""Log-probabilities of sampled and prompt tokens, from the logits of the step's own forward pass.

Which distribution: the model's own, `log_softmax` of the logits the model (with the row's
adapter) produced, before `logit_bias`, penalties, temperature and top-k / top-p / min-p. That
is vLLM's default (`logprobs_mode="raw_logprobs"`: "before any logit processors") and what OpenAI
reports (its logprobs do not change with temperature, nor, by its users' reports since early
2024, with `logit_bias`); vLLM's older engine reported the processed distribution instead. So a
token's logprob does not depend on the request's sampling settings, a greedy request and a
sampled one see the same numbers, a token forced by a +100 bias shows the logprob the model gave
it, and scoring a prompt (lm-eval) gets the model's likelihoods.

Sampled tokens: `SamplingParams.logprobs = k` lists the chosen token's logprob and the k most
likely tokens beside it, computed before the sampler changes the logits.

Prompt tokens (`prompt_logprobs = k`): the logit at position p scores token p + 1, so the runner
keeps every position of a prompt chunk that scores a prompt token the row still lacks
(`prompt_positions`), in the prefill itself, chunk by chunk (also across chunked prefill and
recomputation after preemption); token 0 has none (None). Such a row does not take its prompt
from the prefix cache, since the logits of cached tokens were never computed (vLLM's choice as
well): the scheduler skips the lookup while a row's prompt logprobs are incomplete; its full
blocks are still cached for the requests after it.

Cost: rows that do not ask pay one attribute test per row and step (and the runner one per
chunk). A row that asks pays a log_softmax and a top-k over its vocabulary row per token; a
prompt chunk being scored keeps [chunk tokens, vocab] float32 logits, bounded by
`max_step_tokens` x vocabulary size, freed after the step.
Thread: the engine core's worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from engine.request import TokenLogprob


@dataclass
class PromptSpan:
    """Positions [first, first + count) of one row's sequence whose kept logits score its prompt."""

    row: object  # engine.row.Row (not imported: row.py imports this module)
    first: int
    count: int


def prompt_positions(scored: list | None, prompt_len: int, start: int, stop: int) -> range:
    """Positions in [start, stop) whose logits score a prompt token not yet in `scored` (the
    row's prompt logprobs so far, None when it asks for none)."""
    if scored is None:
        return range(0)
    return range(max(start, len(scored) - 1), min(stop, prompt_len - 1))


class LogprobMaker:
    """Builds TokenLogprobs from log-probabilities; token strings are cached per id."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._strings: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._strings.get(token_id)
        if text is None:
            text = self._strings[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def text(self, token_ids: Sequence[int]) -> str:
        """A prompt's text as the client sees it echoed (its special tokens included)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def entries(self, logits: torch.Tensor, chosen: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
        """Row i of `logits` [m, vocab] scores token `chosen[i]` with its `top[i]` most likely tokens."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ids = torch.tensor(chosen, device=logprobs.device).unsqueeze(-1)
        chosen_values = logprobs.gather(-1, ids).squeeze(-1).tolist()
        k = max(top, default=0)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        return [
            TokenLogprob(token, self.token(token), value, [
                (i, self.token(i), v) for i, v in zip(top_ids[row][: top[row]], top_values[row][: top[row]])
            ])
            for row, (token, value) in enumerate(zip(chosen, chosen_values))
        ]
