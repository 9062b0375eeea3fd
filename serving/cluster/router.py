"""The adapter-affinity request router for the LoraEngine deployment (a Ray Serve
`RequestRouter`, built on its public FIFO and multiplex mixins).

Serve's default router (power of two choices) prefers, for a second or two, replicas that have
*registered* the request's model id, then falls back to any: it cannot tell a replica whose
adapter is on the device from one that would have to read it from disk, and it pins a hot
adapter to the replica that first loaded it. This router ranks every candidate with
`placement.rank_replicas` over what each replica reports through `record_routing_stats`
(adapters on the device, adapters in host memory, queue depth) and what this router itself
knows sooner: where it routed each adapter since the last report, and how many of its own
requests each replica is running. A forecaster's pre-load call carries `spread=True` when the
adapter is hot; requests for adapters the forecaster marked hot (`publish_hot`, written by the
gateway that owns this router's process) spread the same way.

Ranked groups of one replica each are returned: Serve tries them in order and takes the
first with room (fewer than `max_ongoing_requests` in flight). When none has room, Serve backs
off before asking again (`should_backoff`), rather than spinning on a saturated deployment.
The hot set is per process: a gateway replica and the routers in it serve one application.
"""

from __future__ import annotations

import time
from collections import defaultdict

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from plora_jax.serverless.placement import ReplicaState, rank_replicas

# Serve pickles this module by value into each process: its globals are a private copy, so the
# process state the gateway writes (the hot set) and reads (the views) lives in `gateway`.
from . import gateway


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, spread_queue: int = 8, memory_s: float = 5.0) -> None:
        """`spread_queue`: the queue depth of every device holder at which an adapter spreads to
        another replica; `memory_s`: how long a routing decision counts as residency before the
        replica's own report replaces it."""
        self.spread_queue = spread_queue
        self.memory_s = memory_s
        self.routed: dict[str, dict[object, float]] = defaultdict(dict)  # adapter -> replica id -> when
        self.inflight: dict[object, int] = defaultdict(int)  # replica id -> requests of this router running there
        self.view: dict = {"app": self.app_name, "replicas": {}}  # published whole by publish_view
        self.pruned_at = time.monotonic()  # when `routed` last dropped decisions older than memory_s
        gateway.register_router(self)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)  # Serve calls this with each new replica set and reports
        self.publish_view()

    def publish_view(self) -> None:
        now = time.monotonic()
        states = [self.state_of(replica, now) for replica in self.curr_replicas.values()]
        self.view = {
            "app": self.app_name,
            "replicas": {
                s.replica_id.unique_id: {"device": sorted(s.device), "host": sorted(s.host), "queue": s.queue}
                for s in states
            },
        }

    def state_of(self, replica: RunningReplica, now: float) -> ReplicaState:
        stats = replica.routing_stats or {}
        rid = replica.replica_id
        recent = {a for a, where in self.routed.items() if now - where.get(rid, -1e18) < self.memory_s}
        device = frozenset(stats.get("device", ())) | recent
        # Before its first report, the ids Serve says it registered stand in for its host tier.
        host = frozenset(stats["host"]) if "host" in stats else frozenset(replica.multiplexed_model_ids)
        queue = max(int(stats.get("queue", 0)), self.inflight[rid])
        return ReplicaState(rid, device, host, queue)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Without it, the base class retries at once when every replica is full: a busy
            # loop on the gateway's event loop for as long as the deployment is saturated.
            pending_request.routing_context.should_backoff = True
        self.forget_gone(candidate_replicas)
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        spread = bool(pending_request.kwargs.get("spread")) if pending_request is not None else False
        now = time.monotonic()
        states = [self.state_of(r, now) for r in candidate_replicas]
        ranked = rank_replicas(adapter or None, states, self.spread_queue, hot=spread or adapter in gateway.hot())
        by_id = {r.replica_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in ranked]

    def forget_gone(self, replicas: list[RunningReplica]) -> None:
        """Drop what this router remembers of replicas no longer in the deployment (died or
        scaled away), so a replica id never lingers as a holder, and routing decisions older
        than `memory_s` (they no longer count), so the memory follows recent traffic."""
        live = {r.replica_id for r in replicas}
        now = time.monotonic()
        if now - self.pruned_at > self.memory_s:
            self.pruned_at = now
            recent = {a: {rid: t for rid, t in w.items() if now - t < self.memory_s} for a, w in self.routed.items()}
            self.routed = defaultdict(dict, {a: w for a, w in recent.items() if w})
        if set(self.inflight) <= live and all(set(w) <= live for w in self.routed.values()):
            return
        self.inflight = defaultdict(int, {rid: n for rid, n in self.inflight.items() if rid in live})
        routed = {a: {rid: t for rid, t in w.items() if rid in live} for a, w in self.routed.items()}
        self.routed = defaultdict(dict, {a: w for a, w in routed.items() if w})

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self.inflight[replica_id] += 1
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self.routed[adapter][replica_id] = time.monotonic()
        self.publish_view()

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        if replica_id in self.inflight:
            self.inflight[replica_id] = max(0, self.inflight[replica_id] - 1)
