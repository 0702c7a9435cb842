"""Where a call to the LLM deployment goes: the adapter rule and the conversation rule as plain
functions over replica ids and queue lengths. deployments/routing/router.py adapts Serve's request
router to `RoutingPolicy` and states the rules in steps; the contracts are here.

Inputs, all read on the router's event loop:
- loads: replica id -> ongoing requests (Serve's queue-length cache or a probe; None: unknown,
  and an unknown length never makes a replica busier);
- each replica's routing stats (`routing_stats()` in deployments/replica/load_report.py): the
  adapters it holds, by tier;
- this router's own memory: where each prefix key was last served (`PrefixTable`), and where it
  sent each adapter lately (`Residency.placed`), which covers the seconds before a replica's
  stats show an adapter it is loading.

Plain Python, no Ray, and nothing from this project but deployments/routing/prefix_keys.py (also
plain): Serve pickles the router's module by value into every process that holds a handle.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.routing.prefix_keys import Key, PrefixTable, call_keys, rendezvous

ADAPTERS = "adapters"  # the routing stats' key: {tier: [adapter names]}
TIERS = ("active", "host", "loading")  # engine/adapter_report.py's tiers, preferred first
PLACED = TIERS.index("loading")  # where this router sent an adapter lately: it is loading there
NOT_RESIDENT = len(TIERS)

Loads = Mapping[str, int | None]  # replica id -> ongoing requests (None: unknown)


@dataclass(frozen=True)
class RoutingSettings:
    """The router's kwargs (`request_router_config.request_router_kwargs`)."""

    max_imbalance: int = 16  # "clearly busier": more than this many requests above the least loaded
    max_prefixes: int = 100_000  # keys remembered (about 100 bytes each)
    prompt_chunk_chars: int = 512  # completion prompts are keyed per chunk of this many characters
    placement_ttl_s: float = 30.0  # how long a replica this router sent an adapter to counts as holding it
    max_placements: int = 10_000  # adapters whose recent placements are remembered
    seed: int | None = None  # of the tie-breaking order within a rank (tests set it)


def clearly_busier(preferred: int | None, least: int | None, max_imbalance: int) -> bool:
    """`preferred`'s queue exceeds the least loaded's by more than `max_imbalance`. Unknown
    lengths (None) never make it busier."""
    return preferred is not None and least is not None and preferred - least > max_imbalance


def least_load(replicas: Sequence[str], loads: Loads) -> int | None:
    """The smallest known queue among `replicas`; None when none is known."""
    return min((loads[r] for r in replicas if loads.get(r) is not None), default=None)


def adapter_key(adapter: str) -> Key:
    """An adapter's name as a rendezvous key (distinct from every prefix key)."""
    return b"adapter\0" + adapter.encode("utf-8", "surrogatepass")


def home(adapter: str, replicas: Sequence[str], loads: Loads, max_imbalance: int) -> str:
    """The replica for `adapter` among those of `replicas` not clearly busier than their least
    loaded, by rendezvous hashing of its name: routers with the same view agree, so concurrent
    cold calls for one adapter meet on one replica (one load, not one per router).
    `replicas` must not be empty."""
    least = least_load(replicas, loads)
    pool = [r for r in replicas if not clearly_busier(loads.get(r), least, max_imbalance)]
    return rendezvous(adapter_key(adapter), pool)


def adapter_candidates(adapter: str | None, replicas: Sequence[str], loads: Loads,
                       holders: Mapping[str, int], max_imbalance: int) -> list[str]:
    """The replicas a call may go to, best tier first.

    No adapter: all of them. An adapter held nowhere: its `home` among the replicas within half
    of `max_imbalance` of the least loaded (so its next calls have that much room before its
    replica counts as clearly busier). Otherwise its holders (tier rank in `holders`: active,
    host, loading); when every holder is clearly busier than the least loaded replica, also the
    least loaded replica that lacks it (ties broken by rendezvous of the name): the adapter
    spreads while its traffic exceeds what its replicas serve, and a lukewarm adapter stays
    where it is."""
    if not adapter:
        return list(replicas)
    resident = sorted((r for r in replicas if r in holders), key=holders.__getitem__)
    if not resident:
        return [home(adapter, replicas, loads, max_imbalance // 2)]
    least = least_load(replicas, loads)
    others = [r for r in replicas if r not in holders]
    if others and all(clearly_busier(loads.get(r), least, max_imbalance) for r in resident):
        resident.append(home(adapter, others, loads, 0))
    return resident


def conversation_ranks(keys: Sequence[Key], candidates: list[str], loads: Loads, known: str | None,
                       holders: Mapping[str, int], max_imbalance: int) -> list[list[str]]:
    """Ranks over `candidates` (Serve takes the least loaded replica with room in the first rank
    that has one). No keys: one rank. Otherwise the preferred replica first: `known` (where the
    call's longest known key was served, if a candidate), else rendezvous of the shortest key
    over the candidates of the best tier; skipped when clearly busier than the least loaded of
    the others."""
    if not keys:
        return [candidates]
    if known is None:
        best = min(holders.get(r, NOT_RESIDENT) for r in candidates)
        known = rendezvous(keys[0], [r for r in candidates if holders.get(r, NOT_RESIDENT) == best])
    others = [r for r in candidates if r != known]
    if others and clearly_busier(loads.get(known), least_load(others, loads), max_imbalance):
        return [others]
    return [[known], others]


def call_adapter(call: Any) -> str | None:
    """The adapter a call needs, by duck typing: a GenerateCall's `adapter`, a RuntimeAdapter's
    `id` (load_runtime_adapter); None for the base model and other calls."""
    adapter = getattr(call, "adapter", None)
    if adapter is None and hasattr(call, "source"):
        adapter = getattr(call, "id", None)
    return adapter if isinstance(adapter, str) and adapter else None


def reported_tiers(stats: Mapping[str, Any]) -> dict[str, int]:
    """Adapter -> tier rank from one replica's routing stats; {} for stats without adapters
    (a replica of another version, or stats not recorded yet)."""
    by_tier = stats.get(ADAPTERS) if isinstance(stats, Mapping) else None
    if not isinstance(by_tier, Mapping):
        return {}
    ranks: dict[str, int] = {}
    for rank, tier in enumerate(TIERS):
        for name in by_tier.get(tier, ()):
            ranks.setdefault(name, rank)
    return ranks


class Residency:
    """Which replicas hold which adapter, in which tier: the replicas' latest routing stats, plus
    the replicas this router sent each adapter to in the last `ttl_s` seconds (counted as
    loading, until the stats catch up; at most `capacity` adapters remembered, least recently
    placed dropped first). One owner: the router's event loop."""

    def __init__(self, ttl_s: float, capacity: int):
        self.ttl_s, self.capacity = ttl_s, capacity
        self._reported: dict[str, dict[str, int]] = {}
        self._placed: OrderedDict[str, dict[str, float]] = OrderedDict()

    def update(self, stats_by_replica: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace what the replicas reported (Serve sends every replica's stats at once)."""
        reported: dict[str, dict[str, int]] = {}
        for replica, stats in stats_by_replica.items():
            for adapter, rank in reported_tiers(stats).items():
                reported.setdefault(adapter, {})[replica] = rank
        self._reported = reported

    def placed(self, adapter: str, replica: str, now: float) -> None:
        """This router sent a call for `adapter` to `replica` at `now`."""
        self._placed.setdefault(adapter, {})[replica] = now
        self._placed.move_to_end(adapter)
        while len(self._placed) > self.capacity:
            self._placed.popitem(last=False)

    def holders(self, adapter: str, now: float) -> dict[str, int]:
        """Replica -> tier rank of the replicas that hold `adapter` or were sent it lately."""
        found = dict(self._reported.get(adapter, {}))
        recent = self._placed.get(adapter, {})
        for replica, when in list(recent.items()):
            if now - when > self.ttl_s:
                del recent[replica]
            else:
                found[replica] = min(found.get(replica, PLACED), PLACED)
        return found


class RoutingPolicy:
    """The whole rule with its state: `rank` a call over the replicas, `routed` when a replica
    accepted it, `update` with the replicas' routing stats. No Ray; one owner."""

    def __init__(self, settings: RoutingSettings):
        self.settings = settings
        self.table = PrefixTable(settings.max_prefixes)
        self.residency = Residency(settings.placement_ttl_s, settings.max_placements)
        self.rng = random.Random(settings.seed)

    def update(self, stats_by_replica: Mapping[str, Mapping[str, Any]]) -> None:
        self.residency.update(stats_by_replica)

    def rank(self, call: Any, loads: Loads, alive: set[str], now: float) -> list[list[str]]:
        """Ranks of replica ids (of `loads`) for `call`: adapter candidates, then the
        conversation rule among them; each rank shuffled (Serve takes the first of the least
        loaded: ties go anywhere). `alive`: every replica of the deployment (the prefix table
        drops entries of the others)."""
        adapter = call_adapter(call)
        holders = self.residency.holders(adapter, now) if adapter else {}
        imbalance = self.settings.max_imbalance
        candidates = adapter_candidates(adapter, list(loads), loads, holders, imbalance)
        keys = self.keys(call)
        known = self.table.lookup(keys, set(candidates), alive) if keys else None
        ranks = conversation_ranks(keys, candidates, loads, known, holders, imbalance)
        return [self.rng.sample(rank, len(rank)) for rank in ranks]

    def routed(self, call: Any, replica: str, now: float) -> None:
        """`replica` accepted `call`: it now holds the call's prefixes, and its adapter."""
        self.table.record(self.keys(call), replica)
        if adapter := call_adapter(call):
            self.residency.placed(adapter, replica, now)

    def keys(self, call: Any) -> list[Key]:
        return call_keys(call, self.settings.prompt_chunk_chars)
