"""The LLM deployment on a simulated multi-node GPU cluster (tests/autoscaling_scenario.py, run
in its own process by the module's fixture, once for every test here): the LLM autoscaling
policy scales it 1 -> 2 -> 1 under load; then, on 2 fixed replicas, the conversation router
keeps each chat's turns on one replica, whose prefix cache serves their history, and moves a
chat whose replica is killed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.autoscaling_scenario import CONVERSATIONS, MAX_TOKENS, TURNS
from tests.serve_fixtures import ROOT

pytestmark = pytest.mark.timeout(600)  # one scenario of several minutes, in the first test's setup


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("autoscaling") / "report.json"
    subprocess.run(
        [sys.executable, "-m", "tests.autoscaling_scenario", str(tiny_model_dir), str(path)],
        cwd=ROOT, check=True, timeout=580,
    )
    return json.loads(path.read_text())


def test_llm_deployment_autoscales_across_gpu_nodes_and_back(report):
    counts = [count for _, count in report["timeline"]]
    assert report["scaled_up"] and max(counts) == 2, report["timeline"]
    assert report["scaled_down"] and counts[-1] == 1, report["timeline"]

    outcomes = report["outcomes"]
    assert len(outcomes) > report["requests_during_load"] > 0  # traffic before, during and after
    assert all(o["status"] == 200 and o["error"] is None and o["tokens"] == MAX_TOKENS for o in outcomes)
    texts = defaultdict(set)
    for o in outcomes:
        texts[o["prompt"]].add(o["text"])
    assert all(len(variants) == 1 for variants in texts.values())  # same answer on every replica

    served = [re.search(r"replica=(\S+)@(\S+)", line).groups() for line in report["request_log"] if "status=200" in line]
    per_replica = Counter(replica for replica, _ in served)
    nodes = {node for _, node in served}
    assert len(per_replica) >= 2 and min(per_replica.values()) >= 3, per_replica  # load was spread
    assert len(nodes) >= 2  # on different (fake GPU) nodes


def conversation_turns(report) -> dict[int, list[dict]]:
    turns = defaultdict(list)
    for t in report["conversations"]["turns"]:
        turns[t["conversation"]].append(t)
    return turns


def prompt_tokens(report) -> dict[str, int]:
    """prompt_tokens of each request in the request log, by response id."""
    found = (re.search(r"id=(\S+) .*prompt_tokens=(\d+)", line) for line in report["request_log"])
    return {m.group(1): int(m.group(2)) for m in found if m}


def test_every_turn_of_a_conversation_lands_on_one_replica_whose_prefix_cache_hits(report):
    """Phase 2 of the scenario: 2 fixed replicas, CONVERSATIONS chats of TURNS turns each (each
    turn re-sends the history plus a new message; replies of REPLY_TOKENS tokens), one turn at
    a time. Every turn is served (the request log names the replica) by its conversation's
    replica, and on each replica that served conversations the prefix cache covered what it
    could over the later turns (2..TURNS), from the replicas' engine stats
    (`prefix_cache_hits / prefix_cache_queries`, read before and after those turns).

    What it could cover: a turn's prompt starts with the previous turn's prompt, which the
    replica that served it holds in full KV blocks (16 tokens); the rest is new to every
    replica: the previous reply (the tiny random model's 24 tokens of noise decode to text
    that re-tokenizes into about 70) and the new question (about 30). Asserted: hits >= 90%
    of those full blocks, and a hit rate >= 0.6. Observed (2026-12-02, two runs): hit rates
    0.655 and 0.649, then 0.651 and 0.655, 1.00-1.01x the full blocks of the previous prompts
    (a few reply blocks re-tokenize the same). A turn sent to the other replica instead finds none of its history there (Serve's
    default router does that about half the time), which would leave a replica at roughly
    half of what it could cover."""
    conversations = report["conversations"]
    turns = conversation_turns(report)
    assert len(turns) == CONVERSATIONS
    for number, chat in turns.items():
        before_kill = [t for t in chat if t["turn"] <= TURNS]
        assert [t["turn"] for t in before_kill] == list(range(1, TURNS + 1))
        assert all(t["status"] == 200 and t["error"] is None and t["replica"] for t in before_kill), before_kill
        assert len({t["replica"] for t in before_kill}) == 1, (number, [t["replica"] for t in before_kill])

    before, after = conversations["counters_before"], conversations["counters_after"]
    assert len(before) == len(after) == 2, (before, after)  # both replicas answered diagnostics
    tokens, block = prompt_tokens(report), conversations["kv_block_size"]
    cacheable = Counter()  # per replica: full blocks of the previous prompt, over the later turns
    for chat in turns.values():
        for previous, turn in zip(chat[:TURNS - 1], chat[1:TURNS]):
            cacheable[turn["replica"]] += tokens[previous["id"]] // block * block
    rates = {}
    for replica, possible in cacheable.items():
        queries = after[replica][0] - before[replica][0]
        hits = after[replica][1] - before[replica][1]
        assert queries > 0, (replica, before, after)
        rates[replica] = hits / queries
        print(f"replica {replica}: prefix-cache hit rate of turns 2-{TURNS} {hits / queries:.3f} "
              f"({hits} of {queries} prompt tokens; {hits / possible:.2f}x the previous prompts' full blocks)")
        assert hits >= 0.9 * possible, (replica, hits, possible)
    assert min(rates.values()) >= 0.6, rates


def test_a_conversation_whose_replica_is_killed_goes_on_elsewhere(report):
    """After the kill, the next turn of each conversation of the killed replica is served by
    another replica and succeeds; the other conversations stay where they were."""
    killed = report["conversations"]["killed"]
    moved = 0
    for chat in conversation_turns(report).values():
        home, last = chat[0]["replica"], chat[-1]
        assert last["turn"] == TURNS + 1
        assert last["status"] == 200 and last["error"] is None and len(last["text"]) > 0, last
        assert last["replica"] is not None, last
        if home == killed:
            moved += 1
            assert last["replica"] != killed, last
        else:
            assert last["replica"] == home, (home, last)
    assert moved >= 1  # conversation 0's replica was the one killed
