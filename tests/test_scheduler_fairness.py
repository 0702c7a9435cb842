"""Fair share (engine/fairness.py) and the admission gate of the scheduler: the counter rules,
then the scheduler over fake steps (no model), then one engine on a tiny model."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from engine.blocks import BlockManager
from engine.config import SamplingParams
from engine.engine import Engine
from engine.fairness import FairShare, ServiceWeights, VirtualCounters
from engine.request import GenerationRequest
from engine.row import Row
from engine.sampling import RowSampler
from engine.scheduler import Scheduler
from tests.tiny_models import ids

A, B, C, D = ("A", None), ("B", None), ("C", None), ("D", None)  # clients: (adapter, tenant)
_ids = itertools.count()


def make_row(adapter: str | None = None, tenant: str | None = None, prompt_len: int = 8, max_tokens: int = 8) -> Row:
    """A row the scheduler can plan for (no tokenizer: nothing here detokenizes)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt = list(range(1, prompt_len + 1))
    request = GenerationRequest(prompt, params, adapter, request_id=f"r{next(_ids)}", tenant=tenant)
    sampler = RowSampler.create(params, prompt, torch.device("cpu"))
    return Row(request, sampler, detok=None, stops=None, eos_ids=frozenset())


@dataclass
class FakeSteps:
    """Drives a scheduler as the engine core does, sampling token 0 for every row that asks."""

    scheduler: Scheduler
    steps: int = 0
    arrived: dict[str, int] = field(default_factory=dict)  # request id -> steps done when it came
    first_token: dict[str, int] = field(default_factory=dict)  # request id -> the step that sampled it

    def add(self, row: Row) -> Row:
        self.scheduler.waiting.append(row)
        self.arrived[row.request_id] = self.steps
        return row

    def step(self) -> None:
        self.steps += 1
        for chunk in self.scheduler.schedule():
            row = chunk.row
            row.num_computed = chunk.start + chunk.length
            if chunk.sample:
                row.sampler.output_ids.append(0)
                self.first_token.setdefault(row.request_id, self.steps)
                if len(row.sampler.output_ids) == row.request.params.max_tokens:
                    self.scheduler.remove(row)

    def wait(self, row: Row) -> int:
        """Steps from a row's arrival to the step that sampled its first token."""
        return self.first_token[row.request_id] - self.arrived[row.request_id]


def scheduler(max_rows: int = 2, num_blocks: int = 512, **options) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, enable_prefix_caching=False), max_rows, 64, **options)


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


# ----- the scheduler ---------------------------------------------------------------------------


def trickle_waits(fair_share: bool, flood: tuple, trickle: tuple) -> tuple[list[int], Scheduler]:
    """One flood request per step for 120 steps, one trickle request every 20 steps, 2 rows of
    8-token prompts and 8-token answers (a row serves about a request per 8 steps, so the
    flood's queue grows); each trickle request's wait for its first token."""
    steps = FakeSteps(scheduler(max_rows=2, fair_share=fair_share))
    trickled = []
    for step in range(120):
        steps.add(make_row(*flood))
        if step % 20 == 0:
            trickled.append(steps.add(make_row(*trickle)))
        steps.step()
    while steps.scheduler.waiting or steps.scheduler.running:
        steps.step()
    return [steps.wait(row) for row in trickled], steps.scheduler


@pytest.mark.parametrize("flood, trickle", [(("A", None), ("B", None)), ((None, "k1"), (None, "k2"))],
                         ids=["adapters", "tenants"])
def test_a_flood_on_one_client_leaves_a_trickle_a_bounded_wait(flood, trickle):
    fair, fair_scheduler = trickle_waits(True, flood, trickle)
    assert max(fair) <= 8 + 1  # at most until one of the flood's rows finishes, then first in line
    fifo, _ = trickle_waits(False, flood, trickle)
    assert fifo == sorted(fifo) and fifo[-1] > 20 * 9  # grows with the flood's queue
    assert fair_scheduler.fair.counters.held <= 2 and fair_scheduler.fair.tracked_rows == 0  # nothing left behind


@pytest.mark.parametrize("fair_share", [True, False])
def test_a_gated_row_is_skipped_keeps_its_place_and_blocks_nobody(fair_share):
    on_device = {None, "B"}

    def can_admit(row: Row) -> bool:
        return row.request.adapter in on_device

    steps = FakeSteps(scheduler(max_rows=4, fair_share=fair_share, can_admit=can_admit))
    gated, *others = [steps.add(make_row(adapter)) for adapter in ("A", "B", None)]
    assert steps.scheduler.admission_order() == [gated, *others]  # the order ignores the gate
    steps.step()
    assert steps.scheduler.running == others and list(steps.scheduler.waiting) == [gated]
    late = steps.add(make_row(None))
    assert steps.scheduler.admission_order() == [gated, late]  # still ahead of later rows
    on_device.add("A")
    steps.step()
    assert steps.scheduler.running == [*others, gated, late]


@pytest.mark.parametrize("fair_share", [True, False])
def test_preempted_rows_come_first_then_a_newcomer_ahead_of_a_flood_being_served(fair_share):
    # 11 blocks of 4 tokens: two 8-token prompts take 2 blocks each (and one spare per running
    # row), then a block per 4 tokens each, until the older row's growth preempts the newer one
    steps = FakeSteps(scheduler(max_rows=2, num_blocks=11, fair_share=fair_share))
    first, second, waiting = [steps.add(make_row("A", max_tokens=20)) for _ in range(3)]
    while steps.scheduler.stats.preemptions == 0:
        steps.step()
    newcomer = steps.add(make_row("B"))
    steps.step()  # B joins at A's counter; A's running row is charged again; the preempted row still does not fit
    assert steps.scheduler.running == [first] and list(steps.scheduler.waiting) == [second, waiting, newcomer]
    expected = [second, newcomer, waiting] if fair_share else [second, waiting, newcomer]
    assert steps.scheduler.admission_order() == expected


# ----- the engine on a tiny model ----------------------------------------------------------------


def first_tokens(engine: Engine, flood: list[GenerationRequest], trickle: GenerationRequest) -> list[str]:
    """Request ids in the order of their first tokens: the flood queued at once, the trickle
    two steps later (the flood is running then)."""
    order: list[str] = []
    for request in flood:
        engine.core.add(engine.new_row(request))
    for step in range(200):
        if step == 2:
            engine.core.add(engine.new_row(trickle))
        for request_id, delta in engine.core.step():
            assert delta.finish_reason in (None, "length"), delta.error
            if request_id not in order:
                order.append(request_id)
        if not engine.core.has_work():
            return order
    raise AssertionError("requests did not finish")


async def test_a_trickle_on_the_base_model_gets_its_first_token_before_a_flood_on_an_adapter(make_engine, adapter_dirs):
    orders = {}
    for fair_share in (True, False):
        engine = make_engine(max_batch_size=2, fair_share=fair_share)
        await engine.load_adapter("alpha", str(adapter_dirs["alpha"]))
        prompt = ids(engine, "Hello there")
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        flood = [GenerationRequest(prompt, params, "alpha", request_id=f"flood{i}") for i in range(8)]
        orders[fair_share] = first_tokens(engine, flood, GenerationRequest(prompt, params, request_id="trickle"))
        await engine.close()
    # fair: the two flood rows running when it came, then the trickle as soon as a row is free
    assert orders[True].index("trickle") == 2
    assert orders[False].index("trickle") == 8  # first come, first served: behind the whole flood
