"""Prometheus metrics through ray.serve.metrics (exported by Ray's metrics agent).

Adapters: the replica's residency and load metrics are deployments/telemetry/adapter_metrics.py's; the
ingress's per-request metrics below are per model name, adapters included, under the label rule
there (`AdapterLabels`: listed names as they are, the others in hash buckets).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ray.serve import metrics

from engine.request import RequestStats

from deployments.telemetry.adapter_metrics import AdapterLabels, AdapterMetrics

if TYPE_CHECKING:  # types only: the ingress imports this module without the engine (and torch)
    from engine.engine import Engine, EngineStats

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]


class LLMMetrics:
    """Engine-side gauges (running, waiting, rows in the batch), admission group sizes, and the
    adapters' metrics (`labels`: deployments/adapter_metrics.app_labels(args); by default every
    adapter is counted in a hash bucket)."""

    def __init__(self, model: str, labels: AdapterLabels = AdapterLabels()):
        self.tags = {"model": model}
        self.adapters = AdapterMetrics(model, labels)
        self._counted = [0] * 6  # what the engine counters below have been told so far
        self.running = metrics.Gauge("llm_running_requests", "Requests in the running batch.", ("model",))
        self.waiting = metrics.Gauge("llm_waiting_requests", "Requests waiting for admission.", ("model",))
        self.rows = metrics.Gauge("llm_batch_rows", "Rows in the engine's decode batch.", ("model",))
        self.kv_tokens = metrics.Gauge("llm_kv_tokens", "KV-cache token slots held by requests.", ("model",))
        self.kv_blocks_used = metrics.Gauge("llm_kv_blocks_used", "KV-cache blocks held by requests.", ("model",))
        self.kv_blocks_cached = metrics.Gauge(
            "llm_kv_blocks_cached", "Unheld KV-cache blocks kept for prefix reuse.", ("model",)
        )
        self.prefix_queries = metrics.Counter(
            "llm_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", ("model",)
        )
        self.prefix_hits = metrics.Counter(
            "llm_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not recomputed).", ("model",)
        )
        self.preemptions = metrics.Counter(
            "llm_preemptions", "Running requests that gave their KV blocks back for lack of memory.", ("model",)
        )
        self.steps = metrics.Counter("llm_engine_steps", "Engine steps that computed tokens.", ("model",))
        self.step_tokens = metrics.Counter(
            "llm_engine_step_tokens", "Tokens computed by engine steps (prompt chunks and decodes).", ("model",)
        )
        self.step_ms = metrics.Counter(
            "llm_engine_step_milliseconds", "Time the engine spent in steps (busy share = rate / 1000).", ("model",)
        )
        self.batch_size = metrics.Histogram(
            "llm_admission_group_size", "Requests per @serve.batch admission group.",
            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",),
        )
        self.batch_size.set_default_tags(self.tags)

    async def watch(self, engine: Engine, period_s: float = 1.0) -> None:
        """Refresh the metrics every `period_s` seconds, for the life of the replica. A refresh
        that fails is logged (once, until one succeeds again) and the loop goes on."""
        failing = False
        while True:
            try:
                self.refresh(engine)
                failing = False
            except Exception:
                if not failing:
                    log.exception("refreshing the LLM metrics failed; retrying every %s s", period_s)
                failing = True
            await asyncio.sleep(period_s)

    def refresh(self, engine: Engine) -> None:
        """Engine gauges and counters, then the adapters' report and the events since the last refresh."""
        self._engine_stats(engine.stats())
        self.adapters.update(engine.adapter_report(), engine.adapter_events())

    def _engine_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.running, self.tags)
        self.waiting.set(stats.waiting, self.tags)
        self.rows.set(stats.batch_size, self.tags)
        self.kv_tokens.set(stats.kv_tokens, self.tags)
        self.kv_blocks_used.set(stats.kv_blocks_used, self.tags)
        self.kv_blocks_cached.set(stats.kv_blocks_cached, self.tags)
        totals = (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.preemptions,
                  stats.steps, stats.step_tokens, int(stats.step_seconds * 1000))
        counters = (self.prefix_queries, self.prefix_hits, self.preemptions,
                    self.steps, self.step_tokens, self.step_ms)
        for i, (counter, total) in enumerate(zip(counters, totals)):  # the engine counts since start
            if total > self._counted[i]:
                counter.inc(total - self._counted[i], self.tags)
                self._counted[i] = total


class RequestMetrics:
    """Ingress-side per-request metrics, tagged by model (the name the client used, through
    `labels`) and outcome; time to first token also by `adapter_load`: "cold" when the request
    waited for its adapter to load (`RequestStats.adapter_load_s` > 0), else "warm"."""

    def __init__(self, labels: AdapterLabels):
        self.labels = labels
        self.requests = metrics.Counter(
            "llm_requests", "Finished requests by model, endpoint and status.", ("model", "endpoint", "status")
        )
        self.ttft = metrics.Histogram(
            "llm_time_to_first_token_seconds", "Time to first token, cold (the adapter was loaded for it) or warm.",
            LATENCY_BUCKETS, ("model", "adapter_load"),
        )
        self.text_held = metrics.Histogram(
            "llm_first_text_held_seconds",
            "From the first token to the first visible text: held back as part of a UTF-8 character or a "
            "possible stop string. Time to first token as a user sees it is the sum of the two.",
            LATENCY_BUCKETS, ("model",),
        )
        self.tpot = metrics.Histogram(
            "llm_time_per_output_token_seconds", "Time per output token after the first.",
            TOKEN_BUCKETS, ("model",),
        )
        self.queue = metrics.Histogram(
            "llm_queue_seconds", "From a request's arrival at the engine to its admission (KV blocks given): "
            "the part of time to first token spent waiting for other requests' work.",
            LATENCY_BUCKETS, ("model",),
        )
        self.cached_tokens = metrics.Counter(
            "llm_cached_prompt_tokens", "Prompt tokens of finished requests found in the prefix cache.", ("model",)
        )
        self.tokens = metrics.Counter("llm_generated_tokens", "Generated tokens.", ("model",))
        self.prompt_tokens = metrics.Counter("llm_prompt_tokens", "Prompt tokens of finished requests.", ("model",))

    def record(self, model: str, endpoint: str, status: int, stats: RequestStats | None) -> None:
        tags = {"model": self.labels(model)}
        self.requests.inc(1, {**tags, "endpoint": endpoint, "status": str(status)})
        if stats is None:
            return
        self.tokens.inc(stats.completion_tokens, tags)
        self.prompt_tokens.inc(stats.prompt_tokens, tags)
        if stats.cached_prompt_tokens:  # Ray's counters refuse 0
            self.cached_tokens.inc(stats.cached_prompt_tokens, tags)
        if stats.queue_s is not None:
            self.queue.observe(stats.queue_s, tags)
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token, {**tags, "adapter_load": adapter_load(stats)})
        if stats.first_text_held_s is not None:
            self.text_held.observe(stats.first_text_held_s, tags)
        if stats.tokens_per_second:
            self.tpot.observe(1.0 / stats.tokens_per_second, tags)


def adapter_load(stats: RequestStats) -> str:
    """The TTFT tag: cold if the request waited for its adapter to be fetched and read, else warm."""
    return "cold" if stats.adapter_load_s > 0 else "warm"
