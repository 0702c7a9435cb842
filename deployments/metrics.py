"""Prometheus metrics through ray.serve.metrics (exported by Ray's metrics agent)."""

from __future__ import annotations

import asyncio

from ray.serve import metrics

from engine.engine import Engine
from engine.request import RequestStats

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]


class LLMMetrics:
    """Engine-side gauges (running, waiting, rows in the batch) and admission group sizes."""

    def __init__(self, model: str):
        self.tags = {"model": model}
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
        """Refresh the gauges every `period_s` seconds, for the life of the replica."""
        counted = [0] * 6  # what the counters below have been told so far
        while True:
            stats = engine.stats()
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
                if total > counted[i]:
                    counter.inc(total - counted[i], self.tags)
                    counted[i] = total
            await asyncio.sleep(period_s)


class RequestMetrics:
    """Ingress-side per-request metrics, tagged by model and outcome."""

    def __init__(self):
        self.requests = metrics.Counter(
            "llm_requests", "Finished requests by model, endpoint and status.", ("model", "endpoint", "status")
        )
        self.ttft = metrics.Histogram(
            "llm_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS, ("model",)
        )
        self.tpot = metrics.Histogram(
            "llm_time_per_output_token_seconds", "Time per output token after the first.",
            TOKEN_BUCKETS, ("model",),
        )
        self.tokens = metrics.Counter("llm_generated_tokens", "Generated tokens.", ("model",))

    def record(self, model: str, endpoint: str, status: int, stats: RequestStats | None) -> None:
        self.requests.inc(1, {"model": model, "endpoint": endpoint, "status": str(status)})
        if stats is None:
            return
        self.tokens.inc(stats.completion_tokens, {"model": model})
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token, {"model": model})
        if stats.tokens_per_second:
            self.tpot.observe(1.0 / stats.tokens_per_second, {"model": model})
