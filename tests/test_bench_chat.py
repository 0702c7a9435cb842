"""bench.chat's engine system and report on a tiny model: the conversations, the counters and
the last turn's timeline come from a real engine in this process."""

from __future__ import annotations

import argparse
from functools import partial

from bench.chat import Workload, converse, engine_chat
from bench.chat_results import SystemRun, Turn, system_table, timeline
from bench.client import RequestResult


def tiny_workload(engine, users: int = 2, turns: int = 2) -> Workload:
    messages = tuple(tuple(f"user {u} says hello for turn {t}" for t in range(turns)) for u in range(users))
    return Workload(messages, engine.loaded.tokenizer, system_prompt="Be brief.")


async def test_the_engine_system_holds_each_users_conversation_and_counts_its_steps(engine):
    args = argparse.Namespace(turns=2, max_tokens=6)

    async def read_stats():
        return engine.stats()

    run = await converse(partial(engine_chat, engine), "engine", tiny_workload(engine), args, read_stats)

    assert sorted((t.user, t.turn) for t in run.turns) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(t.result.error is None and t.result.ttft is not None for t in run.turns)
    for user in (0, 1):
        first, second = sorted((t for t in run.turns if t.user == user), key=lambda t: t.turn)
        assert second.sent_at > first.sent_at + first.result.ttft
        # turn 2 re-sends turn 1 and its reply, which the prefix cache holds
        assert second.prompt_tokens > first.prompt_tokens + first.result.tokens
        assert second.result.cached_tokens > 0
    assert run.prefix_cache.hits > 0
    assert run.steps.steps > 0 and run.steps.tokens >= sum(t.prompt_tokens - t.result.cached_tokens
                                                            for t in run.turns)
    assert "Engine steps during the turns:" in "\n".join(system_table(run, 2))


def result(ttft: float) -> RequestResult:
    return RequestResult(ttft, 1.0, 4, 4, ())


def test_the_timeline_lists_a_turns_requests_in_the_order_they_were_sent():
    turns = (Turn(0, 1, result(0.5), 100, sent_at=3.25), Turn(1, 1, result(0.25), 100, sent_at=3.0),
             Turn(0, 0, result(0.1), 50, sent_at=0.0))
    run = SystemRun("engine", turns, 5.0, 2.0, 0.0)

    assert timeline(run, 1) == ("Turn 2, requests in the order sent: user 2 at +0.000 s, TTFT 0.250 s; "
                                "user 1 at +0.250 s, TTFT 0.500 s.")
    assert timeline(run, 2) == "Turn 3: no requests."
