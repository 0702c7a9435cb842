"""ConversationRouter: Serve's request router for the LLM deployment, conversation- and adapter-aware.

Prefix caching (engine/blocks.py) pays only when a chat's next turn reaches the replica that
holds its earlier turns; Serve's default router (the less loaded of two random replicas) does
that about 1/N of the time with N replicas. The routing rule, for a call with prefix keys
(deployments/prefix_keys.py):

1. Candidates: Serve's multiplexing first (`apply_multiplex_routing`: replicas that hold the
   call's adapter, then those with the fewest adapters, then all), so adapter affinity is kept.
2. Preferred replica among the candidates: the one that last served the call's longest known
   key (this router's LRU table); for a key nobody here has seen, rendezvous hashing of the
   call's shortest key over the candidates, so every router in the cluster picks the same
   replica for a new conversation without shared state.
3. Clearly busier: the preferred replica is skipped when its ongoing requests (Serve's queue
   length cache, probed when stale) exceed the least loaded candidate's by more than
   `max_imbalance` (default: half of `max_batch_size`, set by deployments/app.py). Up to that, a
   prefix hit (no prefill of the history) is worth more than joining a smaller batch; beyond
   it, the new request would likely wait for a row. Then the least loaded candidate serves.
4. Ranks `[[preferred], others]`: Serve tries the preferred replica first and, if its queue
   is full, the least loaded of the others.

Calls without keys (info(), diagnostics(), prompts shorter than one chunk) go to the least
loaded candidate, ties broken at random.

Compared with Ray's PrefixCacheAffinityRouter (ray/llm/_internal/serve/routing_policies):
that one keeps a character prefix tree in a detached actor and calls `ray.get` on it from
the router's event loop for every request (blocking every other request's routing), and
matches any shared text, so every conversation with the same system prompt lands on one
replica. Here the state is local (a hash lookup per message), bounded, and consistent across
routers by hashing instead of by a shared actor.

State: a `PrefixTable` (key -> replica id), owned by the router's event loop (Serve calls
`choose_replicas`, `on_request_routed` and `update_replicas` there): no locks. Entries of
replicas that left are skipped and dropped on lookup; the table survives replicas coming and
going.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import MultiplexMixin, RequestRouter

from deployments.prefix_keys import Key, PrefixTable, call_keys, rendezvous


@dataclass(frozen=True)
class RoutingSettings:
    """The router's kwargs (`request_router_config.request_router_kwargs`)."""

    max_imbalance: int = 16  # see rule 3 in the module docstring
    max_prefixes: int = 100_000  # keys remembered (about 100 bytes each)
    prompt_chunk_chars: int = 512  # completion prompts are keyed per chunk of this many characters


def clearly_busier(preferred: int | None, least: int | None, max_imbalance: int) -> bool:
    """Rule 3: the preferred replica's queue exceeds the least loaded's by more than
    `max_imbalance`. Unknown lengths (None) never make it busier."""
    return preferred is not None and least is not None and preferred - least > max_imbalance


class ConversationRouter(MultiplexMixin, RequestRouter):
    """Sends a conversation's turns to the replica holding its prefix (module docstring)."""

    def initialize_state(self, **kwargs: int) -> None:
        self.settings = RoutingSettings(**kwargs)
        self.table = PrefixTable(self.settings.max_prefixes)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidates = self._candidates(candidate_replicas, pending_request)
        if not candidates:
            return []
        keys = self._keys(pending_request)
        if not keys:
            return [random.sample(candidates, len(candidates))]
        preferred = self._preferred(keys, candidates)
        others = [r for r in candidates if r is not preferred]
        lengths = await self._queue_lengths(candidates)
        known = [lengths[r.replica_id] for r in others if lengths[r.replica_id] is not None]
        if others and clearly_busier(lengths[preferred.replica_id], min(known, default=None),
                                     self.settings.max_imbalance):
            return [others]
        return [[preferred], others]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        """The replica accepted the call: it now holds the call's prefixes."""
        self.table.record(self._keys(pending_request), replica_id.unique_id)

    def _candidates(self, replicas: list[RunningReplica], pending: PendingRequest | None) -> list[RunningReplica]:
        """Rule 1: the replicas multiplexing allows (all of them for the base model)."""
        if pending is not None and pending.metadata.multiplexed_model_id:
            allowed = self.apply_multiplex_routing(pending_request=pending)
            return [r for r in replicas if r.replica_id in allowed]
        if pending is not None:
            pending.routing_context.should_backoff = True  # all are candidates: back off when all are full
        return list(replicas)

    def _keys(self, pending: PendingRequest | None) -> list[Key]:
        if pending is None or not pending.args:
            return []
        return call_keys(pending.args[0], self.settings.prompt_chunk_chars)

    def _preferred(self, keys: Sequence[Key], candidates: list[RunningReplica]) -> RunningReplica:
        """Rule 2: the replica of the longest known key, else the rendezvous choice."""
        by_id = {r.replica_id.unique_id: r for r in candidates}
        alive = {r.unique_id for r in self._replica_id_set}
        known = self.table.lookup(keys, set(by_id), alive)
        return by_id[known if known is not None else rendezvous(keys[0], by_id)]

    async def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        """Ongoing requests per replica: Serve's cache, or a probe (with its short deadline)."""
        lengths = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in replicas}
        stale = [r for r in replicas if lengths[r.replica_id] is None]
        if stale:
            for replica, length in await self._probe_queue_lens(stale, 0):
                lengths[replica.replica_id] = length
        return lengths
