"""Per-adapter metrics without Ray's metrics agent: the label rule, the conversion of the engine's
adapter report and events into values, and what the metric objects are told (recording fakes in
place of ray.serve.metrics objects)."""

from __future__ import annotations

import asyncio
import logging

from deployments.contract.settings import AppArgs
from deployments.telemetry.adapter_metrics import (
    AdapterLabels, AdapterMetrics, app_labels, event_readings, residency_readings,
)
from deployments.telemetry.metrics import LLMMetrics, RequestMetrics
from engine.adapter_report import AdapterEvent, AdapterReport, ResidentAdapter
from engine.core import EngineStats
from engine.request import RequestStats


class Recorder:
    """Stands in for a ray.serve.metrics object: keeps every call as (value, tags)."""

    def __init__(self):
        self.calls: list[tuple[float, dict]] = []

    def set(self, value: float, tags: dict | None = None) -> None:
        self.calls.append((value, dict(tags or {})))

    inc = observe = set

    def by(self, key: str) -> dict[str, float]:
        """The last value per value of tag `key`."""
        return {tags[key]: value for value, tags in self.calls}


def recording(holder: object, *names: str) -> object:
    for name in names:
        setattr(holder, name, Recorder())
    return holder


REPORT = AdapterReport(
    adapters=[
        ResidentAdapter("listed-a", "active", nbytes=100), ResidentAdapter("listed-b", "host", nbytes=50),
        ResidentAdapter("store/x", "active", nbytes=100), ResidentAdapter("store/y", "loading", nbytes=30),
    ],
    active_slots=8, device_bytes=1000, device_bytes_used=200, host_bytes=5000, host_bytes_used=250,
)
LABELS = AdapterLabels.of(["base", "listed-a", "listed-b", "listed-c"])


def test_listed_names_keep_their_label_and_any_number_of_others_share_a_few_buckets():
    assert LABELS("listed-a") == "listed-a" and LABELS("base") == "base"
    others = {LABELS(f"store/adapter-{i}") for i in range(5000)}
    assert len(others) == 16 and all(label.startswith("~other-") for label in others)
    assert LABELS("store/adapter-7") == AdapterLabels.of(["base"])("store/adapter-7")  # the same in every process
    assert AdapterLabels.of(["a", "b", "a", "c"], limit=2).named == {"a", "b"}  # the first `limit`, in order


def test_an_application_lists_its_base_model_and_its_pinned_and_configured_adapters():
    args = AppArgs(model="./models/base", served_model_name="base", adapters={"pirate": "./a"},
                   pinned_adapters=["store/vip"])
    assert app_labels(args).named == {"base", "./models/base", "pirate", "store/vip"}


def test_residency_counts_and_bytes_per_tier_and_the_tier_of_each_listed_adapter():
    readings = residency_readings(REPORT, LABELS, shown=["listed-c"])
    assert readings.adapters == {"active": 2, "host": 1, "loading": 1}
    assert readings.nbytes == {"active": 200, "host": 250, "loading": 30}
    assert readings.capacity == {"active": 1000, "host": 5000} and readings.active_slots == 8
    assert readings.tiers == {"listed-a": 3, "listed-b": 2, "listed-c": 0}  # listed-c left since last time


def test_events_count_per_adapter_label_and_kind_and_loads_give_their_seconds():
    events = [AdapterEvent("load", "listed-a", 0.7), AdapterEvent("evict", "listed-a"),
              AdapterEvent("load", "store/x", 2.0), AdapterEvent("load_failed", "store/x"),
              AdapterEvent("activate", "listed-b")]
    readings = event_readings(events, LABELS)
    bucket = LABELS("store/x")
    assert readings.counts == {("listed-a", "load"): 1, ("listed-a", "evict"): 1, (bucket, "load"): 1,
                               (bucket, "load_failed"): 1, ("listed-b", "activate"): 1}
    assert readings.load_seconds == [("listed-a", 0.7), (bucket, 2.0)]


def test_the_replica_sets_tier_gauges_and_resets_a_listed_adapter_once_it_leaves():
    metrics = recording(AdapterMetrics("base", LABELS), "resident", "nbytes", "capacity", "slots", "tier",
                        "events", "load_seconds")
    metrics.update(REPORT, [AdapterEvent("load", "listed-a", 0.7)])
    assert metrics.resident.by("tier") == {"active": 2, "host": 1, "loading": 1}
    assert metrics.tier.by("adapter") == {"listed-a": 3, "listed-b": 2}
    assert metrics.events.calls == [(1, {"adapter": "listed-a", "kind": "load"})]
    assert metrics.load_seconds.calls == [(0.7, {"adapter": "listed-a"})]
    metrics.tier.calls.clear()
    metrics.update(AdapterReport([ResidentAdapter("listed-b", "active")]), [])
    assert metrics.tier.by("adapter") == {"listed-a": 0, "listed-b": 3}
    metrics.tier.calls.clear()
    metrics.update(AdapterReport(), [])
    assert metrics.tier.by("adapter") == {"listed-b": 0}
    metrics.tier.calls.clear()
    metrics.update(AdapterReport(), [])
    assert metrics.tier.calls == []  # nothing shown any more: nothing to reset


def stats(**fields) -> RequestStats:
    values = dict(prompt_tokens=10, completion_tokens=5, dropped_messages=0, latency=1.0,
                  time_to_first_token=0.2, tokens_per_second=20.0)
    return RequestStats(**{**values, **fields})


def test_ttft_is_tagged_cold_when_the_request_waited_for_its_adapter():
    metrics = recording(RequestMetrics(LABELS), "requests", "ttft", "text_held", "tpot", "tokens", "prompt_tokens",
                        "queue", "cached_tokens")
    metrics.record("listed-a", "chat", 200, stats(adapter_load_s=0.6, first_text_held_s=0.05, queue_s=0.2,
                                                  cached_prompt_tokens=8))
    metrics.record("listed-a", "chat", 200, stats())
    metrics.record("store/x", "chat", 200, stats(adapter_load_s=1.0))
    assert [tags for _, tags in metrics.ttft.calls] == [
        {"model": "listed-a", "adapter_load": "cold"}, {"model": "listed-a", "adapter_load": "warm"},
        {"model": LABELS("store/x"), "adapter_load": "cold"},
    ]
    assert metrics.requests.calls[0] == (1, {"model": "listed-a", "endpoint": "chat", "status": "200"})
    assert metrics.prompt_tokens.calls[0] == (10, {"model": "listed-a"})
    assert metrics.text_held.calls == [(0.05, {"model": "listed-a"})]  # only where text was released
    assert metrics.queue.calls == [(0.2, {"model": "listed-a"})]  # only where the request was admitted
    assert metrics.cached_tokens.calls == [(8, {"model": "listed-a"})]  # Ray's counters refuse 0


class FakeEngine:
    """Engine stats, and adapter reports only when `adapters` (an engine without them fails)."""

    def __init__(self, adapters: bool):
        self.refreshes = 0
        if adapters:
            self.adapter_report = lambda: REPORT
            self.adapter_events = lambda: [AdapterEvent("load", "store/x", 1.0)]

    def stats(self) -> EngineStats:
        self.refreshes += 1
        return EngineStats(running=1, waiting=0, batch_size=1, kv_tokens=16, kv_blocks_total=10, kv_blocks_used=1,
                           kv_blocks_cached=0, prefix_cache_queries=self.refreshes, prefix_cache_hits=0, preemptions=0,
                           finished_requests=0, generated_tokens=0, tracked_requests=1)


def test_the_replica_loop_refreshes_engine_and_adapter_metrics_and_outlives_a_failing_refresh(caplog):
    metrics = LLMMetrics("base", LABELS)
    recording(metrics, "running", "prefix_queries")
    recording(metrics.adapters, "resident", "nbytes", "capacity", "slots", "tier", "events", "load_seconds")
    metrics.refresh(FakeEngine(adapters=True))
    assert metrics.running.calls == [(1, {"model": "base"})]
    assert metrics.adapters.events.calls == [(1, {"adapter": LABELS("store/x"), "kind": "load"})]

    async def run_briefly(engine: FakeEngine) -> None:
        task = asyncio.create_task(metrics.watch(engine, period_s=0.001))
        while engine.refreshes < 3:
            await asyncio.sleep(0.001)
        task.cancel()

    engine = FakeEngine(adapters=False)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        asyncio.run(run_briefly(engine))
    assert engine.refreshes >= 3  # the loop went on after each failure
    assert len([r for r in caplog.records if "refreshing the LLM metrics failed" in r.message]) == 1
    assert sum(value for value, _ in metrics.prefix_queries.calls) == engine.refreshes  # increments add up to the total
