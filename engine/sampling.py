"""Choose the next token of every row from its logits, each row with its own settings.

Order, per step: logit bias, penalties, grammar mask, then the choice (greedy, or temperature,
top-k, top-p, min-p and a draw). A row's `logit_bias` (OpenAI's: token id -> bias in [-100,
100]) is added to its raw logits first, as vLLM does, by one scatter-add over every biased
row's (row, token) pairs, kept as tensors per row (`TokenBias`, built once when the row is
created: no loop over bias entries per step). The grammar mask comes after it, so a bias never
lets a token the grammar forbids through: -100 bans a token, +100 forces it where the grammar
allows it. Logprobs are not taken from here: engine/logprobs.py scores the logits from before
any of this (vLLM's default `raw_logprobs`), so a bias changes which token is chosen, not the
logprobs reported for it.

Penalties run per row (only rows that ask for them); temperature, top-k, top-p and min-p run
vectorized over the rows that sample; each sampling row draws from its own torch.Generator,
so a seeded request gives the same tokens alone or inside any batch. A row with a grammar
(engine/constraints.py) has the tokens it forbids masked before the choice and is told the
token chosen after it; rows without one share the step untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.config import SamplingParams
from engine.constraints import TokenConstraint, mask_logits


@dataclass(frozen=True)
class TokenBias:
    """One row's logit bias as tensors on the logits' device: `values[i]` is added to token `ids[i]`."""

    ids: torch.Tensor  # int64 [k]
    values: torch.Tensor  # float32 [k]

    @classmethod
    def create(cls, bias: dict[int, float], device: torch.device) -> TokenBias | None:
        """The tensors of `bias` (None when it is empty: the row is not biased)."""
        if not bias:
            return None
        return cls(torch.tensor(list(bias), dtype=torch.long, device=device),
                   torch.tensor(list(bias.values()), dtype=torch.float32, device=device))


@dataclass
class RowSampler:
    """The sampling state of one row: its settings, its generator and the tokens it has seen."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    constraint: TokenConstraint | None = None
    bias: TokenBias | None = None

    @property
    def constraint_done(self) -> bool:
        """The row's grammar took its end-of-sequence token (even under `ignore_eos`)."""
        return self.constraint is not None and self.constraint.done

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], device: torch.device,
               constraint: TokenConstraint | None = None) -> RowSampler:
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        return cls(params=params, generator=generator, prompt_ids=prompt_ids, constraint=constraint,
                   bias=TokenBias.create(params.logit_bias, device))


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[RowSampler]) -> None:
    """Add each row's logit bias to its logits [rows, vocab], in place: one scatter-add for the
    whole batch. Token ids must be in the vocabulary (the engine checks them per request)."""
    biased = [(i, row.bias) for i, row in enumerate(rows) if row.bias is not None]
    if not biased:
        return
    row_index = torch.cat([torch.full_like(bias.ids, i) for i, bias in biased])
    token_index = torch.cat([bias.ids for _, bias in biased])
    values = torch.cat([bias.values for _, bias in biased]).to(logits.dtype)
    logits.index_put_((row_index, token_index), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, row: RowSampler) -> torch.Tensor:
    """HF-style repetition penalty over prompt and output; OpenAI presence/frequency over output."""
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(row.prompt_ids + row.output_ids, device=logits.device).unique()
        picked = logits[seen]
        logits[seen] = torch.where(
            picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
        )
    if row.output_ids and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(row.output_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


CANDIDATES = 128  # a filtering row first looks at its most likely tokens only


@dataclass
class _Filtered:
    """Rows' k most likely tokens `ids` [n, k], their `logits` (temperature applied, filtered-out
    ones -inf), and whether each row's cut falls within them (`settled` [n])."""

    logits: torch.Tensor
    ids: torch.Tensor
    settled: torch.Tensor


def drawable(logits: torch.Tensor, params: Sequence[SamplingParams]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, (filtered logits, their token ids) to draw from; each row's depends on that row
    alone, never on its neighbours (a seed gives the same tokens in any batch).

    A row without filters draws from its whole vocabulary in place. A filtering row (top-k,
    top-p, min-p) looks at its CANDIDATES most likely tokens when its cut falls among them (its
    top_k within them, their mass past its top_p, or its min_p threshold above the last of
    them), else at its whole vocabulary sorted: the same tokens survive either way, but a
    top-k of CANDIDATES costs a fraction of sorting the vocabulary."""
    vocab = logits.shape[-1]
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    plain = [i for i, p in enumerate(params) if not p.uses_filters]
    if plain:
        scaled = _tempered(logits[plain], [params[i] for i in plain])
        ids = torch.arange(vocab, device=logits.device)
        for row, i in zip(scaled, plain):
            out[i] = (row, ids)
    pending = [i for i, p in enumerate(params) if p.uses_filters]
    for k in (min(CANDIDATES, vocab), vocab):
        if not pending:
            break
        found = _filtered(logits[pending], [params[i] for i in pending], k)
        settled = found.settled.tolist() if k < vocab else [True] * len(pending)
        for j, i in enumerate(pending):
            if settled[j]:
                out[i] = (found.logits[j], found.ids[j])
        pending = [i for j, i in enumerate(pending) if not settled[j]]
    return [out[i] for i in range(len(params))]


def _tempered(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    return logits / temps.unsqueeze(-1)


def _filtered(logits: torch.Tensor, params: Sequence[SamplingParams], k: int) -> _Filtered:
    """Temperature, then top-k, top-p and min-p over each row's k most likely tokens (their
    probabilities over the whole row)."""
    device, vocab = logits.device, logits.shape[-1]
    logits = _tempered(logits, params)
    ordered, ids = logits.topk(k, dim=-1) if k < vocab else logits.sort(dim=-1, descending=True)
    probs = (ordered - logits.logsumexp(dim=-1, keepdim=True)).exp()
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device).unsqueeze(-1)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=probs.dtype).unsqueeze(-1)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=probs.dtype).unsqueeze(-1)
    remove = torch.arange(k, device=device).unsqueeze(0) >= top_k
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p  # keep the smallest set reaching top_p
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    settled = ((top_k <= k) | ((top_p < 1.0) & (probs[:, :-1].sum(-1, keepdim=True) >= top_p))
               | (probs[:, -1:] < min_p * probs[:, :1])).squeeze(-1)
    return _Filtered(ordered.masked_fill(remove, float("-inf")), ids, settled)


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: [n, vocab], filtered-out entries -inf."""
    out = torch.full_like(logits, float("-inf"))
    for row, (kept, ids) in zip(out, drawable(logits, params)):
        row.scatter_(-1, ids, kept)
    return out


def sample_next_tokens(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int | None]:
    """Next token id per row, or None for a row whose logits are not finite (NaN, inf).

    logits: [len(rows), vocab]. A broken row (a bad adapter, fp16 overflow) never
    affects the tokens chosen for the other rows.
    """
    logits = logits.float()
    # A row's max is NaN if it holds a NaN and +inf if it holds +inf; its min is -inf if it
    # holds -inf: two reductions instead of an elementwise test over [rows, vocab].
    finite_rows = torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))
    finite = finite_rows.tolist()
    if not all(finite):
        logits[~finite_rows] = 0.0
    apply_logit_bias(logits, rows)
    for i, row in enumerate(rows):
        if row.params.uses_penalties:
            apply_penalties(logits[i], row)
    mask_logits(logits, [row.constraint for row in rows])
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()
    sampling = [i for i, row in enumerate(rows) if not row.params.greedy and finite[i]]
    if sampling:
        for (kept, ids), i in zip(drawable(logits[sampling], [rows[i].params for i in sampling]), sampling):
            tokens[i] = int(ids[torch.multinomial(kept.softmax(dim=-1), 1, generator=rows[i].generator)])
    for row, token, ok in zip(rows, tokens, finite):
        if row.constraint is not None and ok:
            row.constraint.accept(token)
    return [token if ok else None for token, ok in zip(tokens, finite)]

