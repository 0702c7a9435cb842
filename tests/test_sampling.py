"""Per-row sampling on hand-made logits."""

from __future__ import annotations

import torch

from engine.config import SamplingParams
from engine.sampling import RowSampler, apply_logit_bias, apply_penalties, filter_logits, sample_next_tokens

CPU = torch.device("cpu")


def row(prompt=(), **params) -> RowSampler:
    return RowSampler.create(SamplingParams(**params), list(prompt), CPU)


def test_greedy_rows_take_the_argmax_and_sampling_rows_their_own_draw():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next_tokens(logits.clone(), [row(temperature=0), row(temperature=0)]) == [1, 0]
    draws = {sample_next_tokens(logits.clone(), [row(temperature=0), row(temperature=2.0)])[1] for _ in range(200)}
    assert draws == {0, 1, 2}


def test_same_seed_same_tokens_whatever_the_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    solo = sample_next_tokens(logits[2:3].clone(), [row(seed=7)])[0]
    rows = [row(), row(temperature=0), row(seed=7), row(top_k=5)]
    assert sample_next_tokens(logits.clone(), rows)[2] == solo
    seeded = row(seed=7)
    sequence = [sample_next_tokens(logits[2:3].clone(), [seeded])[0] for _ in range(10)]
    again = row(seed=7)
    assert [sample_next_tokens(logits[2:3].clone(), [again])[0] for _ in range(10)] == sequence


def test_top_k_top_p_min_p_mask_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(min_p=0.2)]
    kept = torch.isfinite(filter_logits(logits, params))
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False], [True, True, True, False]]
    one = filter_logits(logits[:1], [SamplingParams(top_p=0.01)])
    assert torch.isfinite(one).tolist() == [[True, False, False, False]]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    cold = filter_logits(logits, [SamplingParams(temperature=0.1)]).softmax(-1)
    assert cold[0, 1] > 0.99


def test_penalties_lower_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    penalised = apply_penalties(logits.clone(), row(prompt=[0, 1], repetition_penalty=2.0))
    assert penalised.tolist() == [1.0, -4.0, 1.0, 1.0]
    r = row(presence_penalty=0.5, frequency_penalty=0.25)
    r.output_ids = [2, 2, 3]
    assert apply_penalties(logits.clone(), r).tolist() == [2.0, -2.0, 1.0 - 1.0, 1.0 - 0.75]


def test_non_finite_rows_fail_alone():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [float("inf"), 0.0], [2.0, 0.0]])
    rows = [row(temperature=0), row(), row(temperature=0), row(temperature=0.5, seed=1)]
    tokens = sample_next_tokens(logits, rows)
    assert tokens[0] == 1 and tokens[1] is None and tokens[2] is None and tokens[3] in (0, 1)


def test_logit_bias_is_added_to_its_own_row_before_the_choice():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    rows = [row(temperature=0, logit_bias={0: 100}), row(temperature=0), row(temperature=0, logit_bias={1: -100, 2: 0.5})]
    assert sample_next_tokens(logits.clone(), rows) == [0, 1, 2]
    biased = logits.clone()
    apply_logit_bias(biased, rows)
    assert biased.tolist() == [[100.0, 5.0, 1.0], [0.0, 5.0, 1.0], [0.0, -95.0, 1.5]]
    draws = {sample_next_tokens(logits[:1].clone(), [row(logit_bias={1: -100, 2: -100})])[0] for _ in range(50)}
    assert draws == {0}


def reference_kept(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens top-k, top-p and min-p keep, by sorting the whole row (the definition)."""
    probs = (logits / p.temperature).softmax(-1)
    order = probs.argsort(descending=True)
    kept, mass = [], 0.0
    for rank, token in enumerate(order.tolist()):
        prob = float(probs[token])
        if rank and ((p.top_k and rank >= p.top_k) or mass >= p.top_p or prob < p.min_p * float(probs[order[0]])):
            break
        kept.append(token)
        mass += prob
    return set(kept)


def test_filters_keep_the_same_tokens_whether_the_cut_is_among_the_candidates_or_past_them():
    from engine.sampling import CANDIDATES

    torch.manual_seed(3)
    vocab = 8 * CANDIDATES
    peaked, flat = torch.randn(vocab) * 8, torch.randn(vocab) * 0.1
    cases = [(peaked, SamplingParams(temperature=0.2, top_p=0.9)),  # cut among the candidates
             (flat, SamplingParams(top_p=0.95)),  # past them: the whole row is sorted
             (flat, SamplingParams(top_k=3 * CANDIDATES)),
             (flat, SamplingParams(min_p=0.5)),
             (peaked, SamplingParams(top_k=5, top_p=0.5, min_p=0.1))]
    logits = torch.stack([row for row, _ in cases])
    kept = torch.isfinite(filter_logits(logits, [p for _, p in cases]))
    for i, (row, params) in enumerate(cases):
        assert set(kept[i].nonzero().flatten().tolist()) == reference_kept(row, params), params
    assert kept[1].sum() > CANDIDATES and kept[2].sum() == 3 * CANDIDATES


def test_a_seeded_row_draws_the_same_beside_rows_that_sort_their_whole_vocabulary():
    torch.manual_seed(4)
    logits = torch.randn(3, 1024)
    logits[0] *= 0.1  # flat: its top_p cut lies past the candidates
    solo = sample_next_tokens(logits[1:2].clone(), [row(seed=11, top_p=0.9)])[0]
    batch = sample_next_tokens(logits.clone(), [row(top_p=0.99), row(seed=11, top_p=0.9), row(temperature=0.5)])
    assert batch[1] == solo
