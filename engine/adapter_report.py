"""What the engine tells the serving layer about its adapters: residency, loads, evictions.

Read by the replica's metrics (deployments/telemetry/metrics.py) and by its routing report (the router
prefers replicas where a request's adapter is resident). Plain data, no torch.

Tiers, from fastest to slowest (engine/adapters.py owns them):
- "active": the weights are in the compute device's adapter pool, usable in a step;
- "host": read and converted, in host memory, one copy into the pool away from active;
- "loading": being fetched from its store or read from disk on the loader thread;
- "disk": only in the store or the local disk cache (not listed in the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Tier = Literal["active", "host", "loading"]
EventKind = Literal["load", "load_failed", "activate", "deactivate", "evict"]


@dataclass(frozen=True)
class AdapterEvent:
    """Something that happened to an adapter. `seconds`: for "load", the fetch and read time
    (what a cold request waited for, at most); for the others 0."""

    kind: EventKind
    adapter: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter in memory: where it is, its size, and whether it may be evicted."""

    name: str
    tier: Tier
    rank: int = 0
    nbytes: int = 0
    pinned: bool = False
    rows_using: int = 0  # running and waiting rows that need it (never evicted while > 0)


@dataclass(frozen=True)
class AdapterReport:
    """A snapshot of a replica's adapters, read between steps."""

    adapters: list[ResidentAdapter] = field(default_factory=list)
    active_slots: int = 0  # max_active_adapters
    device_bytes: int = 0  # adapter pool capacity on the compute device
    device_bytes_used: int = 0
    host_bytes: int = 0  # host tier capacity
    host_bytes_used: int = 0

    def names(self, *tiers: Tier) -> list[str]:
        """Names of the adapters in the given tiers (all tiers when none given)."""
        return [a.name for a in self.adapters if not tiers or a.tier in tiers]
