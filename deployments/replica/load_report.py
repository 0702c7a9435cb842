"""What an LLM replica reports to Serve: load to its autoscaler
(deployments/routing/autoscaling_policy.py reads it), adapter residency to the routers
(deployments/routing/placement.py reads it)."""

from __future__ import annotations

import statistics
import time
from collections import deque

from engine.adapter_report import AdapterReport
from engine.engine import EngineStats

from deployments.routing.autoscaling_policy import KV_BLOCKS, KV_BLOCKS_USED, ROWS, ROWS_WANTED, TTFT_S
from deployments.routing.placement import ADAPTERS, TIERS


class RecentTTFT:
    """Times to first token of the requests finished in the last `window_s` seconds (at most
    `limit` of them). Owned by the replica's event loop."""

    def __init__(self, window_s: float = 30.0, limit: int = 1024):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=limit)

    def add(self, ttft_s: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, ttft_s))

    def median(self, now: float | None = None) -> float:
        """Median of the window; 0 when no request finished in it."""
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        return statistics.median(t for _, t in self._samples) if self._samples else 0.0


def load_report(stats: EngineStats, max_batch_size: int, ttft_s: float) -> dict[str, float]:
    """The replica's autoscaling metrics (`record_autoscaling_stats`)."""
    return {
        ROWS_WANTED: float(stats.running + stats.waiting),
        ROWS: float(max_batch_size),
        KV_BLOCKS_USED: float(stats.kv_blocks_used),
        KV_BLOCKS: float(stats.kv_blocks_total),
        TTFT_S: ttft_s,
    }


def routing_stats(report: AdapterReport) -> dict[str, dict[str, list[str]]]:
    """The replica's routing stats (`record_routing_stats`): the adapters it holds, by tier,
    `{"adapters": {"active": [...], "host": [...], "loading": [...]}}`, names sorted.

    Residency only, no load figures: Serve's controller polls this every
    `request_routing_stats_period_s` and, whenever any replica's dict differs from its last one,
    sends every replica's info to every handle; a figure that moved every period (running
    requests) would make that a broadcast per replica per period. The routers take load from
    their queue-length cache, fresher anyway."""
    return {ADAPTERS: {tier: sorted(report.names(tier)) for tier in TIERS}}
