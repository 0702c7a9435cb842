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
