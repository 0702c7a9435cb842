"""ConversationRouter: Serve's request router for the LLM deployment, adapter- and conversation-aware.

Two things make a replica the right one for a call. Its adapter: a replica that holds it
(engine/adapter_report.py: active on the compute device, in host memory, or loading) serves at
once, any other first loads it (from its folder or a store) and spends memory on it. Its
conversation: prefix caching (engine/blocks.py) pays only when a chat's next turn reaches the
replica that holds its earlier turns; Serve's default router (the less loaded of two random
replicas) does that about 1/N of the time with N replicas. The rule, for one call (plain
functions in placement.py; loads are ongoing requests from Serve's queue-length cache, probed
when stale; "clearly busier" means more than `max_imbalance` requests above the least loaded,
default half of `max_batch_size`, set by deployments/app.py):

1. Residency: where the call's adapter is, from each replica's routing stats
   (`record_routing_stats`, deployments/replica/load_report.py: adapters by tier) and from the
   replicas this router sent it to in the last `placement_ttl_s` (counted as loading until the
   stats, which arrive every `request_routing_stats_period_s`, show it).
2. Candidates: no adapter (the base model): every replica. An adapter held somewhere: its
   holders, active first, then host, then loading; if every holder is clearly busier than the
   least loaded replica, also the least loaded replica without it. So an adapter whose traffic
   exceeds what its replicas serve spreads to one more replica at a time, and a lukewarm one
   stays on one. An adapter held nowhere: one replica, chosen by rendezvous hashing of its
   name among the replicas within `max_imbalance / 2` of the least loaded, so concurrent cold
   calls (from every router) meet on one replica and wait on one load instead of loading it
   everywhere, and its next calls have room there before it counts as clearly busier.
3. Preferred replica among the candidates: the one that last served the call's longest known
   prefix key (prefix_keys.py; this router's LRU table); for a key nobody here has seen,
   rendezvous hashing of the call's shortest key over the candidates of the best tier, so every
   router places a new conversation on the same replica without shared state.
4. Clearly busier: the preferred replica is skipped when clearly busier than the least loaded
   other candidate. Up to that, a prefix hit (no prefill of the history) is worth more than
   joining a smaller batch; beyond it, the new request would likely wait for a row.
5. Ranks `[[preferred], other candidates]`: Serve tries the preferred replica first and, if
   its queue is full, the least loaded of the others; when all are full, the call backs off
   and the rule runs again with fresh loads (once its holders' queues exceed the least loaded
   replica's by `max_imbalance`, step 2 adds a replica).

Calls without keys (info(), diagnostics(), prompts shorter than one chunk) go to the least
loaded candidate.

The state is local (a hash lookup per message), bounded, and consistent across routers by
hashing instead of by a shared actor; how this compares with Serve's multiplexing and Ray's
PrefixCacheAffinityRouter, and what it measured against Serve's default router: bench/README.md,
"Conversation routing".

State: a `RoutingPolicy` (prefix table, residency), owned by the router's event loop (Serve
calls `choose_replicas`, `on_request_routed` and `update_replicas` there): no locks. Entries of
replicas that left are skipped and dropped on lookup; the state survives replicas coming and
going.
"""

from __future__ import annotations

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

from deployments.routing.placement import RoutingPolicy, RoutingSettings


class ConversationRouter(RequestRouter):
    """Sends a call to a replica holding its adapter and its conversation's prefix (module docstring)."""

    def initialize_state(self, **kwargs: float) -> None:
        self.policy = RoutingPolicy(RoutingSettings(**kwargs))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """New replicas or new routing stats (Serve sends every replica's info when one changes)."""
        super().update_replicas(replicas)
        self.policy.update({r.replica_id.unique_id: r.routing_stats for r in replicas})

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # the ranks are all the rule allows
        if not candidate_replicas:
            return []
        lengths = await self._queue_lengths(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {r.replica_id.unique_id: lengths[r.replica_id] for r in candidate_replicas}
        alive = {r.unique_id for r in self._replica_id_set}
        ranks = self.policy.rank(_call(pending_request), loads, alive, self._get_curr_time_s())
        return [[by_id[replica] for replica in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        """The replica accepted the call: it now holds the call's prefixes and adapter."""
        self.policy.routed(_call(pending_request), replica_id.unique_id, self._get_curr_time_s())

    async def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        """Ongoing requests per replica: Serve's cache, or a probe (with its short deadline)."""
        lengths = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in replicas}
        stale = [r for r in replicas if lengths[r.replica_id] is None]
        if stale:
            for replica, length in await self._probe_queue_lens(stale, 0):
                lengths[replica.replica_id] = length
        return lengths


def _call(pending: PendingRequest | None) -> object:
    """The call a handle method was given (its first argument), or None."""
    return pending.args[0] if pending is not None and pending.args else None
