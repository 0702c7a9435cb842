"""Per-adapter metrics with bounded label cardinality: the label rule, the conversion of a
replica's adapter report and events into metric values, and the replica's adapter metrics.

Cardinality. Serve tags every series with its replica, so an `adapter` label multiplies series
by replicas, and a series once exported stays in Prometheus for its retention whether or not it
is updated again. With thousands of adapters loaded by name from a store, a label per adapter
ever seen would grow without bound. The rule (`AdapterLabels`), the same in every process:
- the names the operator listed get their own series: the base model (name and path), then
  `pinned_adapters`, then `adapters` from the config, the first `limit` (64) of them;
- every other adapter (store and runtime adapters) counts in one of `buckets` (16) shared
  series, `~other-NN`, NN from a CRC-32 of its name: totals stay exact, a skewed bucket shows
  that some unlisted adapter is hot, and pinning or listing it gives it its own series.
So at most limit + buckets values per label, per replica. Residency has no per-adapter series
for bucketed adapters (only counts and bytes per tier); the listed ones get `llm_adapter_tier`.

Per-request figures (requests, tokens, TTFT cold and warm) are the ingress's (deployments/
metrics.py, RequestMetrics: `model` is the name the client used, under the same rule); the
replica's are below: residency gauges, load and eviction events, load latency.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ray.serve import metrics

from engine.adapter_report import AdapterEvent, AdapterReport

from deployments.contract.settings import AppArgs
from deployments.routing.placement import TIERS

TIER_CODES = {"active": 3, "host": 2, "loading": 1}  # llm_adapter_tier's values; 0: not resident
LOAD_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class AdapterLabels:
    """The label value of a model or adapter name: itself if listed, else its hash bucket."""

    named: frozenset[str] = frozenset()
    buckets: int = 16

    @classmethod
    def of(cls, names: Iterable[str], limit: int = 64, buckets: int = 16) -> AdapterLabels:
        """The first `limit` distinct `names` (in order) get their own label."""
        listed = list(dict.fromkeys(names))[:limit]
        return cls(frozenset(listed), buckets)

    def __call__(self, name: str) -> str:
        if name in self.named:
            return name
        return f"~other-{zlib.crc32(name.encode('utf-8', 'surrogatepass')) % self.buckets:02d}"


def app_labels(args: AppArgs) -> AdapterLabels:
    """The rule for an application: the base model's names, pinned adapters, configured adapters."""
    return AdapterLabels.of([args.model_name, args.model, *args.pinned_adapters, *args.adapters])


@dataclass(frozen=True)
class ResidencyReadings:
    """Gauge values from one AdapterReport."""

    adapters: dict[str, int]  # tier -> adapters in it
    nbytes: dict[str, int]  # tier -> bytes they use (active: the device pool, host: the host tier)
    capacity: dict[str, int]  # tier -> bytes it may use
    active_slots: int
    tiers: dict[str, int]  # listed adapter -> TIER_CODES value, 0 for those shown before and gone


def residency_readings(report: AdapterReport, labels: AdapterLabels,
                       shown: Iterable[str] = ()) -> ResidencyReadings:
    """The report as gauge values. `shown`: listed adapters whose tier gauge was last set above
    0 (set to 0 now if they left)."""
    adapters = {tier: 0 for tier in TIERS}
    loading_bytes = 0
    tiers = dict.fromkeys(shown, 0)
    for adapter in report.adapters:
        adapters[adapter.tier] += 1
        loading_bytes += adapter.nbytes if adapter.tier == "loading" else 0
        if adapter.name in labels.named:
            tiers[adapter.name] = max(tiers.get(adapter.name, 0), TIER_CODES[adapter.tier])
    return ResidencyReadings(
        adapters=adapters,
        nbytes={"active": report.device_bytes_used, "host": report.host_bytes_used, "loading": loading_bytes},
        capacity={"active": report.device_bytes, "host": report.host_bytes},
        active_slots=report.active_slots,
        tiers=tiers,
    )


@dataclass
class EventReadings:
    """Counter increments and histogram samples from a batch of AdapterEvents."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (adapter label, kind) -> events
    load_seconds: list[tuple[str, float]] = field(default_factory=list)  # (adapter label, seconds) per load


def event_readings(events: Iterable[AdapterEvent], labels: AdapterLabels) -> EventReadings:
    readings = EventReadings()
    for event in events:
        label = labels(event.adapter)
        readings.counts[label, event.kind] += 1
        if event.kind == "load":
            readings.load_seconds.append((label, event.seconds))
    return readings


class AdapterMetrics:
    """The replica's adapter metrics; `update(report, events)` once per refresh."""

    def __init__(self, model: str, labels: AdapterLabels):
        self.labels = labels
        self._shown: set[str] = set()
        self.resident = metrics.Gauge("llm_adapters_resident", "Adapters in each tier.", ("model", "tier"))
        self.nbytes = metrics.Gauge("llm_adapter_bytes", "Bytes of adapter weights in each tier.", ("model", "tier"))
        self.capacity = metrics.Gauge(
            "llm_adapter_capacity_bytes", "Bytes each tier may hold (active: the device pool).", ("model", "tier")
        )
        self.slots = metrics.Gauge("llm_adapter_active_slots", "Adapters usable in one step.", ("model",))
        self.tier = metrics.Gauge(
            "llm_adapter_tier", "Where a listed adapter is: 3 active, 2 host, 1 loading, 0 not resident.",
            ("model", "adapter"),
        )
        self.events = metrics.Counter(
            "llm_adapter_events", "Adapter loads, load failures, activations, deactivations and evictions.",
            ("model", "adapter", "kind"),
        )
        self.load_seconds = metrics.Histogram(
            "llm_adapter_load_seconds", "Time to fetch and read an adapter.", LOAD_BUCKETS, ("model", "adapter")
        )
        for metric in (self.resident, self.nbytes, self.capacity, self.slots, self.tier, self.events,
                       self.load_seconds):
            metric.set_default_tags({"model": model})

    def update(self, report: AdapterReport, events: Iterable[AdapterEvent]) -> None:
        residency = residency_readings(report, self.labels, self._shown)
        for tier in TIERS:
            self.resident.set(residency.adapters[tier], {"tier": tier})
            self.nbytes.set(residency.nbytes[tier], {"tier": tier})
        for tier, capacity in residency.capacity.items():
            self.capacity.set(capacity, {"tier": tier})
        self.slots.set(residency.active_slots)
        for adapter, code in residency.tiers.items():
            self.tier.set(code, {"adapter": adapter})
        self._shown = {adapter for adapter, code in residency.tiers.items() if code}
        counted = event_readings(events, self.labels)
        for (adapter, kind), count in counted.counts.items():
            self.events.inc(count, {"adapter": adapter, "kind": kind})
        for adapter, seconds in counted.load_seconds:
            self.load_seconds.observe(seconds, {"adapter": adapter})
