"""The conversation router's pieces: prefix keys, the LRU table, rendezvous placement, the busier rule.

The router on a live cluster (turns stick to one replica, a replica leaving) is tested in
tests/test_autoscaling.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from deployments.messages import GenerateCall
from deployments.prefix_keys import PrefixTable, call_keys, chat_keys, rendezvous
from deployments.routing import clearly_busier
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
    code = ("from types import SimpleNamespace as M; from deployments.prefix_keys import chat_keys; "
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
