"""Fair share (engine/fairness.py): the counter rules."""

from __future__ import annotations

import itertools

import torch

from engine.config import SamplingParams
from engine.fairness import FairShare, ServiceWeights, VirtualCounters
from engine.request import GenerationRequest
from engine.row import Row
from engine.sampling import RowSampler

A, B, C, D = ("A", None), ("B", None), ("C", None), ("D", None)  # clients: (adapter, tenant)
_ids = itertools.count()


def make_row(adapter: str | None = None, tenant: str | None = None, prompt_len: int = 8, max_tokens: int = 8) -> Row:
    """A row the scheduler can plan for (no tokenizer: nothing here detokenizes)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt = list(range(1, prompt_len + 1))
    request = GenerationRequest(prompt, params, adapter, request_id=f"r{next(_ids)}", tenant=tenant)
    sampler = RowSampler.create(params, prompt, torch.device("cpu"))
    return Row(request, sampler, detok=None, stops=None, eos_ids=frozenset())


# ----- the counter rules ---------------------------------------------------------------------


def test_the_least_counter_goes_first_fifo_within_a_client_and_among_equal_counters():
    counters = VirtualCounters()
    for client in (A, A, B, C, D):
        counters.arrive(client)
    counters.charge(A, 10, 0)
    assert list(counters.order([(A, "a1", 5), (A, "a2", 5), (B, "b1", 5)])) == ["b1", "a1", "a2"]
    # C and D both at 0: D's row came first; each pick adds its cost, so they take turns
    assert list(counters.order([(D, "d1", 3), (C, "c1", 3), (D, "d2", 3), (C, "c2", 3)])) == ["d1", "c1", "d2", "c2"]
    assert counters.counter(D) == counters.counter(C) == 0  # ordering changes no counter


def test_generated_tokens_weigh_four_prompt_tokens():
    counters = VirtualCounters()
    counters.arrive(A)
    counters.charge(A, 10, 2)
    assert counters.counter(A) == 10 + 2 * 4 == ServiceWeights().cost(10, 2)


def test_a_client_without_waiting_rows_is_lifted_to_the_floor_on_arrival():
    counters = VirtualCounters()
    counters.arrive(A)
    counters.arrive(B)
    counters.start(B)  # B runs a long request while A keeps waiting and being served
    counters.charge(A, 100, 0)
    counters.charge(B, 30, 0)
    counters.refresh_floor()
    assert counters.floor == 100  # the least counter among clients with waiting rows (A's)
    counters.arrive(B)  # B, running but not waiting, banked nothing
    counters.arrive(C)  # new
    assert counters.counter(B) == counters.counter(C) == 100
    counters.charge(A, 50, 0)
    counters.arrive(A)  # A still waits: never lifted (nor lowered)
    assert counters.counter(A) == 150


def test_a_pause_sheds_no_service_and_idle_counters_are_bounded():
    counters = VirtualCounters(max_idle=2)
    counters.arrive(A)
    counters.start(A)
    counters.charge(A, 500, 0)
    counters.leave(A, running=True)  # idle, well above the floor (0): remembered
    counters.arrive(A)
    assert counters.counter(A) == 500
    counters.leave(A, running=False)
    for n, client in enumerate([B, C, D, ("E", "k")]):  # four more clients come, are served, leave
        counters.arrive(client)
        counters.charge(client, 600 + n, 0)
        counters.leave(client, running=False)
    assert counters.held == 2  # only the two most recently idle are kept
    assert counters.counter(A) == counters.floor == 0  # A was forgotten: it starts from the floor
    counters.arrive(D)  # back where it left
    counters.refresh_floor()
    assert counters.counter(D) == counters.floor == 602
    counters.arrive(A)
    counters.leave(A, running=False)
    assert counters.held == 2  # D and E: A, idle at the floor, is dropped (a lift gives it as much)


def test_a_chunk_is_charged_for_prompt_tokens_computed_once_and_its_sample():
    fair = FairShare()
    row = make_row("A", prompt_len=10)
    fair.sync([row])
    fair.started(row)
    fair.charge(row, 4, 4, False)  # tokens 0-3 came from the prefix cache: not computed, not charged
    fair.charge(row, 8, 2, True)  # the prompt's end and its first sampled token
    assert fair.counters.counter(A) == 6 + 4
    fair.preempted(row)
    fair.started(row)
    fair.charge(row, 0, 11, True)  # recomputed after a preemption: only the new sample is charged
    fair.charge(row, 11, 1, True)  # a decode
    assert fair.counters.counter(A) == 10 + 4 + 4
    fair.removed(row)
    assert fair.counters.held == 1  # idle and above the floor: remembered
