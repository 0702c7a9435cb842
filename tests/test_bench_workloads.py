"""bench/workloads.py and bench/relay.py: the spread workload's lengths are seeded, bounded and
log-normal-like; the relay rewrites guidellm's vLLM extensions for transformers serve."""

from __future__ import annotations

import statistics

from bench.workloads import PROMPT_RANGE, REPLY_RANGE, describe, fixed_requests, spread_requests


def count_words(text: str) -> int:
    return len(text.split())


def test_the_spread_workload_is_the_same_list_every_time_and_within_its_bounds():
    first = spread_requests(200, 96, 40, count_words)
    assert first == spread_requests(200, 96, 40, count_words)
    assert all(REPLY_RANGE[0] <= r.max_tokens <= REPLY_RANGE[1] for r in first)
    assert all(PROMPT_RANGE[0] <= r.prompt_tokens <= PROMPT_RANGE[1] for r in first)
    assert all(count_words(r.message) <= max(r.prompt_tokens, 60) for r in first)  # one sentence may overshoot


def test_the_spread_workload_has_its_medians_and_a_long_tail():
    requests = spread_requests(400, 96, 40, count_words)
    replies = [r.max_tokens for r in requests]
    prompts = [r.prompt_tokens for r in requests]
    assert 30 <= statistics.median(replies) <= 50 and 80 <= statistics.median(prompts) <= 115
    assert max(replies) >= 4 * statistics.median(replies)
    assert len({r.message for r in requests}) == len(requests)  # no two prompts alike: no shared prefix


def test_the_fixed_workload_gives_every_request_the_same_reply_length():
    requests = fixed_requests(10, 16)
    assert {r.max_tokens for r in requests} == {16} and "replies of 16 tokens" in describe(requests)


def test_the_relay_spells_ignore_eos_as_transformers_serve_takes_it():
    from bench.relay import rewrite_body
    from bench.systems import TRANSFORMERS_IGNORE_EOS

    body = {"model": "m", "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert rewrite_body(body) == {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                                  **TRANSFORMERS_IGNORE_EOS}
    assert rewrite_body({"model": "m", "stream_options": {"continuous_usage_stats": True}}) == {"model": "m"}


def test_processes_get_their_role_from_the_command_line():
    from bench.process_cpu import OTHER, role_of

    assert role_of(["ray::ServeReplica:llm:LLMServer"]) == "llm replica"
    assert role_of(["ray::ProxyActor"]) == "proxy"
    assert role_of(["/usr/bin/python", "-m", "guidellm", "run"]) == "guidellm"
    assert role_of(["/opt/ray/core/src/ray/raylet/raylet", "--node"]) == "ray daemons"
    assert role_of(["bash"]) == OTHER


def test_step_figures_come_from_the_counters_growth():
    from bench.load import EngineSteps
    from engine.core import EngineStats

    def stats(steps: int, seconds: float, rows: int) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, steps=steps, step_seconds=seconds, step_rows=rows)

    # steps, rows per step 8.0, ms per step 100.0, busy 0.50 of the wall time
    assert EngineSteps.between(stats(10, 1.0, 40), stats(30, 3.0, 200)).cells(4.0) == "| 20 | 8.0 | 100.0 | 0.50 "
    assert EngineSteps.between(stats(10, 1.0, 40), stats(10, 1.0, 40)).cells(4.0) == "| 0 | - | - | - "


def test_the_spread_workload_with_sigma_zero_gives_every_request_the_medians():
    requests = spread_requests(20, 96, 40, count_words, sigma=0.0)
    assert {r.prompt_tokens for r in requests} == {96} and {r.max_tokens for r in requests} == {40}
