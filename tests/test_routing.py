"""The router's pieces: prefix keys, the LRU table, rendezvous placement, the busier rule, and
the adapter rule (deployments/routing/placement.py) with the routing stats it reads.

The whole router over simulated replicas (a hot adapter, cold ones, conversations) is tested in
tests/test_routing_simulation.py; on a live cluster (turns stick to one replica, a replica
leaving) in tests/test_autoscaling.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from typing import get_args

import pytest

from deployments.contract.messages import GenerateCall
from deployments.contract.runtime_adapters import RuntimeAdapter
from deployments.replica.load_report import routing_stats
from deployments.routing.placement import (
    TIERS, Residency, adapter_candidates, call_adapter, clearly_busier, conversation_ranks, home,
)
from deployments.routing.prefix_keys import PrefixTable, call_keys, chat_keys, rendezvous
from engine.adapter_report import AdapterReport, ResidentAdapter, Tier
from engine.config import SamplingOverrides
from engine.prompt import ChatMessage, Instruction
from tests.serve_fixtures import ROOT

SYSTEM = ChatMessage("system", "You are helpful.")


def chat(*texts: str, adapter: str | None = None) -> GenerateCall:
    """A conversation: the system prompt, then user and assistant messages alternating."""
    roles = ["user", "assistant"]
    messages = [SYSTEM] + [ChatMessage(roles[i % 2], t) for i, t in enumerate(texts)]
    return GenerateCall(SamplingOverrides(), adapter=adapter, messages=messages)


def test_a_next_turn_extends_the_previous_turns_keys():
    turn1 = call_keys(chat("hi"), 512)
    turn2 = call_keys(chat("hi", "hello!", "how are you?"), 512)
    assert len(turn1) == 1 and len(turn2) == 3  # from the first user message on, one per message
    assert turn2[:1] == turn1


def test_conversations_sharing_only_the_system_prompt_share_no_key():
    assert not set(call_keys(chat("hi"), 512)) & set(call_keys(chat("bye"), 512))


def test_the_adapter_and_the_roles_are_part_of_the_key():
    base = call_keys(chat("hi"), 512)
    assert call_keys(chat("hi", adapter="pirate"), 512) != base
    assert chat_keys(None, [ChatMessage("user", "hi")]) != chat_keys(None, [ChatMessage("system", "hi")])


def test_keys_do_not_depend_on_the_process():
    """blake2b, not Python's per-process salted hash: routers in other processes agree."""
    code = ("from types import SimpleNamespace as M; from deployments.routing.prefix_keys import chat_keys; "
            "print(chat_keys('a', [M(role='user', content='hi')])[0].hex())")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == chat_keys("a", [ChatMessage("user", "hi")])[0].hex()


def test_completion_prompts_are_keyed_per_full_chunk():
    def keys(prompt):
        return call_keys(GenerateCall(SamplingOverrides(), prompt=prompt), 8)

    assert keys("short") == []
    assert len(keys("a" * 17)) == 2
    assert keys("a" * 16 + "b")[:2] == keys("a" * 16 + "c")[:2] == keys("a" * 17)
    assert len(keys(list(range(5)))) == 2  # token ids: chunks of 8 // 4 ids
    assert keys(Instruction("x" * 20)) == keys("x" * 20 + "\0")


def test_the_table_is_bounded_and_drops_the_least_recently_used():
    table = PrefixTable(capacity=3)
    table.record([b"a", b"b"], "r1")
    table.record([b"c"], "r2")
    assert table.lookup([b"a"], {"r1", "r2"}, {"r1", "r2"}) == "r1"  # a is now the most recent
    table.record([b"d"], "r2")
    assert len(table) == 3
    assert table.lookup([b"b"], {"r1", "r2"}, {"r1", "r2"}) is None  # b went first
    assert table.lookup([b"a"], {"r1"}, {"r1", "r2"}) == "r1"


def test_lookup_takes_the_longest_key_among_the_candidates_and_forgets_replicas_that_left():
    table = PrefixTable(capacity=10)
    table.record([b"k1"], "r1")
    table.record([b"k1", b"k2"], "r2")  # the conversation moved on to r2
    table.record([b"k3"], "r3")
    keys = [b"k1", b"k2", b"k3"]
    assert table.lookup(keys, {"r1", "r2", "r3"}, {"r1", "r2", "r3"}) == "r3"
    assert table.lookup(keys, {"r1", "r2"}, {"r1", "r2", "r3"}) == "r2"  # r3 alive, not a candidate
    assert len(table) == 3
    assert table.lookup(keys, {"r1", "r2"}, {"r1", "r2"}) == "r2"  # r3 left: its entry is dropped
    assert len(table) == 2
    assert table.lookup([b"zzz"], {"r1"}, {"r1"}) is None


def test_rendezvous_spreads_keys_and_moves_only_the_keys_of_a_replica_that_leaves():
    keys = [bytes([i, j]) for i in range(40) for j in range(10)]
    replicas = ["r1", "r2", "r3", "r4"]
    before = {k: rendezvous(k, replicas) for k in keys}
    assert min(Counter(before.values()).values()) > len(keys) / 8  # every replica gets a share
    after = {k: rendezvous(k, ["r1", "r2", "r4"]) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "r3"}
    assert {k: rendezvous(k, reversed(replicas)) for k in keys} == before  # order does not matter


@pytest.mark.parametrize(("preferred", "least", "busier"), [
    (20, 4, False),   # 16 more: still preferred
    (21, 4, True),    # 17 more: clearly busier
    (None, 0, False),  # unknown lengths never make it busier
    (30, None, False),
])
def test_the_preferred_replica_is_skipped_only_when_clearly_busier(preferred, least, busier):
    assert clearly_busier(preferred, least, max_imbalance=16) is busier


REPLICAS = ["r1", "r2", "r3", "r4"]


def candidates(adapter, loads, holders, max_imbalance=8):
    return adapter_candidates(adapter, REPLICAS, loads, holders, max_imbalance)


def test_base_model_calls_may_go_anywhere():
    assert candidates(None, dict.fromkeys(REPLICAS, 0), {}) == REPLICAS


def test_an_adapter_held_nowhere_goes_to_one_replica_by_its_name_among_the_least_loaded():
    """Every router with the same view picks the same replica, so concurrent cold calls meet;
    "least loaded": within half of max_imbalance of the least."""
    idle = dict.fromkeys(REPLICAS, 0)
    homes = {name: candidates(name, idle, {}) for name in (f"a{i}" for i in range(40))}
    assert all(len(h) == 1 for h in homes.values())
    assert len({h[0] for h in homes.values()}) == 4  # different adapters, different homes
    busy = {**idle, homes["a0"][0]: 5}  # more than half of max_imbalance above the least loaded
    assert candidates("a0", busy, {}) != homes["a0"]
    assert candidates("a0", {**idle, homes["a0"][0]: 4}, {}) == homes["a0"]  # 4 more: still its home


def test_holders_come_best_tier_first_and_a_lukewarm_adapter_stays_on_them():
    loads = {"r1": 8, "r2": 3, "r3": 0, "r4": 0}
    holders = {"r1": 2, "r2": 1}  # loading on r1, in host memory on r2
    assert candidates("a", loads, holders) == ["r2", "r1"]
    assert candidates("a", loads, {"r1": 0}) == ["r1"]  # 8 above the least loaded: not clearly busier


def test_an_adapter_whose_holders_are_all_clearly_busier_adds_the_least_loaded_other_replica():
    loads = {"r1": 20, "r2": 12, "r3": 3, "r4": 5}
    assert candidates("a", loads, {"r1": 0, "r2": 0}) == ["r1", "r2", "r3"]
    assert candidates("a", loads, {"r1": 0, "r3": 0}) == ["r1", "r3"]  # r3 holds it and is the least loaded
    tied = {"r1": 20, "r2": 0, "r3": 0, "r4": 0}  # ties: by the adapter's name, the same everywhere
    added = {candidates(name, tied, {"r1": 0})[1] for name in (f"a{i}" for i in range(40))}
    assert added == {"r2", "r3", "r4"}


def test_unknown_loads_never_make_a_replica_busier():
    loads = {"r1": None, "r2": 0, "r3": 0, "r4": 0}
    assert candidates("a", loads, {"r1": 0}) == ["r1"]
    assert home("a", ["r1"], {"r1": None}, 8) == "r1"


def test_a_known_conversation_keeps_its_replica_unless_it_is_clearly_busier():
    loads = {"r1": 10, "r2": 3, "r3": 0}
    keys = [b"k1", b"k2"]
    assert conversation_ranks(keys, ["r1", "r2"], loads, "r1", {}, 8) == [["r1"], ["r2"]]
    assert conversation_ranks(keys, ["r1", "r3"], loads, "r1", {}, 8) == [["r3"]]  # 10 > 0 + 8
    assert conversation_ranks([], ["r1", "r2"], loads, None, {}, 8) == [["r1", "r2"]]  # no keys: one rank


def test_a_new_conversation_prefers_the_adapters_best_tier():
    loads = dict.fromkeys(REPLICAS, 0)
    holders = {"r1": 1, "r2": 0, "r3": 0}  # host on r1, active on r2 and r3
    preferred = {conversation_ranks([bytes([i])], ["r2", "r3", "r1"], loads, None, holders, 8)[0][0]
                 for i in range(40)}
    assert preferred == {"r2", "r3"}


def test_the_routing_stats_carry_residency_by_tier_and_the_router_reads_them():
    assert set(TIERS) == set(get_args(Tier))
    report = AdapterReport([ResidentAdapter("b", "active"), ResidentAdapter("a", "active"),
                            ResidentAdapter("c", "host"), ResidentAdapter("d", "loading")])
    stats = routing_stats(report)
    assert stats == {"adapters": {"active": ["a", "b"], "host": ["c"], "loading": ["d"]}}
    residency = Residency(ttl_s=10, capacity=100)
    residency.update({"r1": stats, "r2": routing_stats(AdapterReport([ResidentAdapter("a", "host")])),
                      "r3": {}})  # r3: no stats yet
    assert residency.holders("a", now=0) == {"r1": 0, "r2": 1}
    assert residency.holders("d", now=0) == {"r1": 2}
    assert residency.holders("zzz", now=0) == {}


def test_where_the_router_sent_an_adapter_counts_as_loading_until_the_stats_catch_up_or_it_expires():
    residency = Residency(ttl_s=10, capacity=2)
    residency.update({"r1": {"adapters": {"host": ["a"]}}})
    residency.placed("a", "r1", now=0)
    residency.placed("a", "r2", now=0)
    assert residency.holders("a", now=5) == {"r1": 1, "r2": 2}  # the reported tier wins where better
    assert residency.holders("a", now=11) == {"r1": 1}
    residency.placed("b", "r1", now=0)
    residency.placed("c", "r1", now=0)
    residency.placed("d", "r1", now=0)  # at most 2 adapters remembered
    assert residency.holders("b", now=1) == {}


def test_the_adapter_of_a_call():
    assert call_adapter(chat("hi", adapter="pirate")) == "pirate"
    assert call_adapter(chat("hi")) is None
    assert call_adapter(RuntimeAdapter("mine", "/tmp/x", "runtime:mine:1")) == "runtime:mine:1"
    assert call_adapter(None) is None and call_adapter([1, 2]) is None
