"""LLMAutoscalingPolicy with constructed AutoscalingContexts, and the replica's load report.

The policy on a live multi-node cluster (1 -> 2 -> 1 under load) is tested in tests/test_autoscaling.py.
"""

from __future__ import annotations

import pytest
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from deployments.replica.load_report import RecentTTFT, load_report
from deployments.routing.autoscaling_policy import (
    KV_BLOCKS, KV_BLOCKS_USED, ROWS, ROWS_WANTED, TTFT_S, LLMAutoscalingPolicy,
)
from engine.core import EngineStats

POLICY = AutoscalingPolicy(policy_function="deployments.routing.autoscaling_policy:LLMAutoscalingPolicy")


def report(rows_wanted: float = 0, kv_used: float = 0, ttft: float = 0.0, rows: int = 32, kv: int = 1000) -> dict:
    return {ROWS_WANTED: rows_wanted, ROWS: rows, KV_BLOCKS_USED: kv_used, KV_BLOCKS: kv, TTFT_S: ttft}


def context(*reports: dict, queued: float = 0, target: int | None = None, now: float = 0.0, state: dict | None = None,
            **config) -> AutoscalingContext:
    """A context as Serve's controller builds it, for replicas r0, r1, ... with these reports."""
    metrics: dict[str, dict[str, float]] = {}
    for i, values in enumerate(reports):
        for name, value in values.items():
            metrics.setdefault(name, {})[f"r{i}"] = value
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, policy=POLICY, **config)
    running = sum(v for v in metrics.get(ROWS_WANTED, {}).values()) + queued
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMServer", app_name="llm", current_num_replicas=len(reports),
        target_num_replicas=len(reports) if target is None else target, running_replicas=[],
        total_num_requests=running, total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config,
    )


def wanted(*reports: dict, **kwargs) -> int:
    return LLMAutoscalingPolicy()(context(*reports, **kwargs))[0]


def test_many_short_requests_that_fit_need_no_new_replica():
    """24 running rows of 32, little KV, fast first tokens: Serve's default (target 24) would be at its edge."""
    assert wanted(report(rows_wanted=24, kv_used=100, ttft=0.3)) == 1


@pytest.mark.parametrize("load", [
    report(rows_wanted=48),  # 16 requests wait for a row
    report(rows_wanted=10, kv_used=950),  # few requests, long contexts: KV cache 95% held
    report(rows_wanted=4, ttft=9.0),  # first tokens slow
])
def test_a_replica_short_of_rows_kv_or_ttft_scales_up(load):
    assert wanted(load) == 2


def test_requests_queued_at_handles_count_as_rows_wanted():
    assert wanted(report(rows_wanted=32), queued=20) == 2


def test_scale_down_waits_until_the_survivors_would_have_room():
    assert wanted(report(rows_wanted=20), report(rows_wanted=20)) == 2  # 40 rows on one replica: too many
    assert wanted(report(rows_wanted=12), report(rows_wanted=8)) == 2  # 20 / 32 = 0.63 > 0.6 on one
    assert wanted(report(rows_wanted=10), report(rows_wanted=8)) == 1  # 18 / 32 = 0.56
    assert wanted(report(), report(), report(), report()) == 1


def test_replicas_without_a_report_are_left_out_and_no_report_keeps_the_target():
    ctx = context(report(rows_wanted=48), {ROWS_WANTED: 0})  # the second replica is still starting
    assert LLMAutoscalingPolicy()(ctx)[0] == 3  # pressure 48 / 32 on the one that reported: ceil(2 x 1.5)
    assert wanted({}, {}, target=3) == 3


def test_serve_applies_its_delays_to_the_decision():
    """Through the wrapper Serve puts around every custom policy: up only after upscale_delay_s."""
    policy = _apply_autoscaling_config(LLMAutoscalingPolicy())
    busy = report(rows_wanted=48)
    replicas, state = policy(context(busy, now=0.0, upscale_delay_s=10))
    assert replicas == 1
    replicas, state = policy(context(busy, state=state, upscale_delay_s=10))
    assert replicas == 1  # the delay has not passed (the wrapper reads time.time())
    assert _apply_autoscaling_config(LLMAutoscalingPolicy())(context(busy, upscale_delay_s=0))[0] == 2


def test_the_replica_reports_rows_kv_and_recent_ttft():
    stats = EngineStats(running=3, waiting=2, batch_size=3, kv_tokens=0, kv_blocks_total=100, kv_blocks_used=40,
                        kv_blocks_cached=5, prefix_cache_queries=0, prefix_cache_hits=0, preemptions=0,
                        finished_requests=0, generated_tokens=0, tracked_requests=5)
    ttft = RecentTTFT(window_s=10)
    ttft.add(1.0, now=0.0)
    ttft.add(3.0, now=5.0)
    ttft.add(2.0, now=6.0)
    assert ttft.median(now=8.0) == 2.0
    assert ttft.median(now=12.0) == 2.5  # the first sample left the window
    assert RecentTTFT().median() == 0.0
    assert load_report(stats, 8, 2.5) == {ROWS_WANTED: 5.0, ROWS: 8.0, KV_BLOCKS_USED: 40.0, KV_BLOCKS: 100.0,
                                          TTFT_S: 2.5}
