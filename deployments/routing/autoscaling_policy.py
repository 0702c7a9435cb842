"""LLMAutoscalingPolicy: Serve's `autoscaling_config.policy` for the LLM deployment, on what a
replica is actually short of.

Serve's default policy scales on ongoing requests per replica, which fits LLM replicas badly: a
replica running 24 short chats is half idle next to one running 24 long ones, and neither count says
whether requests wait. Each LLM replica reports instead (`record_autoscaling_stats` in
deployments/replica/llm.py, names below), and Serve averages each report over `look_back_period_s`:

- rows: running + waiting requests in its engine, and its `max_batch_size` (rows it can run);
- KV blocks held by running requests, and its KV blocks in all;
- TTFT: the median time to first token of the requests it finished lately.

From these, over the replicas that reported (requests queued at handles count as rows wanted):

    pressure = max(rows wanted / rows,  KV blocks held / (KV blocks x kv_usage_target),
                   mean TTFT / ttft_target_s)

Pressure 1 is a replica at its edge: every row busy with more waiting, the KV cache
`kv_usage_target` full (beyond it the engine preempts), or TTFT at the target. Rows and
blocks add up across replicas, so `n x pressure / m` is what m replicas would see (TTFT is
treated the same, roughly: under load it grows with the queue). The decision for n replicas:

- pressure > 1: ceil(n x pressure) replicas;
- else the fewest m < n with n x pressure / m <= `downscale_to` (a band: 2 -> 1 at pressure
  0.3 with the default 0.6, so a replica is not removed only to be started again);
- else n.

Serve then applies `upscale_delay_s` / `downscale_delay_s` (the decision must hold that long),
the up/downscaling factors and `min_replicas` / `max_replicas` to this decision, as it does to
its own policy's. Thresholds and their reasons: serve_config.yaml.

The controller unpickles this module by value: it imports nothing from this project.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

ROWS_WANTED = "llm_rows_wanted"  # running + waiting requests in the engine
ROWS = "llm_rows"  # max_batch_size
KV_BLOCKS_USED = "llm_kv_blocks_used"
KV_BLOCKS = "llm_kv_blocks"
TTFT_S = "llm_ttft_s"  # median TTFT of recent requests; 0 when there were none


@dataclass(frozen=True)
class Pressure:
    """Each signal's share of its threshold, over the replicas that reported."""

    rows: float
    kv: float
    ttft: float

    @property
    def value(self) -> float:
        return max(self.rows, self.kv, self.ttft)


def pressure(metrics: dict[str, dict[Any, float]], queued: float, kv_usage_target: float,
             ttft_target_s: float) -> Pressure | None:
    """The pressure on the replicas whose reports have every metric; None if none has."""
    needed = (ROWS_WANTED, ROWS, KV_BLOCKS_USED, KV_BLOCKS, TTFT_S)
    replicas = set.intersection(*(set(metrics.get(name, {})) for name in needed))
    if not replicas:
        return None

    def total(name: str) -> float:
        return sum(metrics[name][r] for r in replicas)

    ttfts = [metrics[TTFT_S][r] for r in replicas if metrics[TTFT_S][r] > 0]
    return Pressure(
        rows=(total(ROWS_WANTED) + queued) / max(total(ROWS), 1.0),
        kv=total(KV_BLOCKS_USED) / max(total(KV_BLOCKS) * kv_usage_target, 1.0),
        ttft=statistics.fmean(ttfts) / ttft_target_s if ttfts else 0.0,
    )


def decide(replicas: int, value: float, downscale_to: float) -> int:
    """Replicas wanted by `replicas` replicas under pressure `value` (module docstring)."""
    if value > 1:
        return math.ceil(replicas * value)
    fewest = max(1, math.ceil(replicas * value / downscale_to - 1e-9))
    return min(replicas, fewest)


class LLMAutoscalingPolicy:
    """`autoscaling_config.policy: {policy_function: deployments.routing.autoscaling_policy:LLMAutoscalingPolicy,
    policy_kwargs: {...}}`; Serve makes one instance and calls it with an AutoscalingContext
    every control-loop tick (on the controller). Holds only its thresholds."""

    def __init__(self, kv_usage_target: float = 0.8, ttft_target_s: float = 5.0, downscale_to: float = 0.6):
        if not (0 < kv_usage_target <= 1 and ttft_target_s > 0 and 0 < downscale_to < 1):
            raise ValueError("need 0 < kv_usage_target <= 1, ttft_target_s > 0 and 0 < downscale_to < 1")
        self.kv_usage_target, self.ttft_target_s, self.downscale_to = kv_usage_target, ttft_target_s, downscale_to

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """(replicas wanted, policy state); no reports yet (replicas starting): keep the target."""
        replicas = ctx.current_num_replicas
        found = pressure(ctx.aggregated_metrics or {}, ctx.total_queued_requests or 0.0,
                         self.kv_usage_target, self.ttft_target_s)
        if replicas == 0 or found is None:
            return ctx.target_num_replicas, {}
        wanted = decide(replicas, found.value, self.downscale_to)
        if ctx.total_num_requests == 0 and ctx.capacity_adjusted_min_replicas == 0:
            wanted = 0  # scale to zero only when nothing is running or queued
        return wanted, {"pressure": [found.rows, found.kv, found.ttft]}
