"""Placement decisions over many replicas: which replica serves a request, which adapters a
control plane pre-loads, how many replicas the forecast needs. Plain functions over plain
records, so the Ray Serve application (`serving.cluster`) and the single-machine serverless
layer (`instances.pick_instance`) apply the same rules and tests check them without a cluster.

Routing (`rank_replicas`): replicas holding the adapter on the device come first, then those
holding a copy in host memory (a copy is one host-to-device transfer away, a read from disk is
not), then the rest, each group least loaded first. A hot adapter must not pin one replica
(ray-project/ray#65691): when every device holder's queue has reached `spread_queue`, or the
forecast marks the adapter hot and fewer than two replicas hold it, the least loaded
non-holder is put first, so the request (or a pre-load) brings the adapter there and the
adapter spreads.

Pre-loading (`prefetch_plan`): the adapters most likely to be requested next interval, at most
as many as the replicas' device slots together, each marked to spread when hot; into full
pools, only as many as there are resident adapters the forecast rates lower (each pre-load
evicts one). Where each goes is the router's choice (`rank_replicas` again), so a pre-load of
an adapter already on a device is a no-op at its holder.

Replica count (`replicas_needed`): Little's law over the forecast request rate and the mean
service time, against the target of ongoing requests per replica, and enough device slots for
the adapters expected to be active; at least one replica whenever any demand is expected (the
pre-warm from zero).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaState:
    replica_id: Hashable
    device: frozenset[str] = frozenset()  # adapters on its device (or loading into it)
    host: frozenset[str] = frozenset()  # adapters registered there with a copy in host memory
    queue: int = 0  # requests running or waiting there


def _tier(adapter: str | None, replica: ReplicaState) -> int:
    if adapter is None or adapter in replica.device:
        return 0
    return 1 if adapter in replica.host else 2


def rank_replicas(
    adapter: str | None, replicas: Sequence[ReplicaState], spread_queue: float = math.inf, hot: bool = False
) -> list[Hashable]:
    """Replica ids, best first, for a request for `adapter` (None: the base model)."""
    order = sorted(range(len(replicas)), key=lambda i: (_tier(adapter, replicas[i]), replicas[i].queue, i))
    ranked = [replicas[i] for i in order]
    if adapter is not None:
        holders = [r for r in ranked if adapter in r.device]
        others = [r for r in ranked if adapter not in r.device]
        if holders and others:
            busiest_holder_free = min(r.queue for r in holders)
            crowded = busiest_holder_free >= spread_queue
            if (crowded and others[0].queue < busiest_holder_free) or (hot and len(holders) < 2):
                ranked = [others[0], *holders, *others[1:]]
    return [r.replica_id for r in ranked]


def prefetch_plan(
    forecast: Mapping[str, float],
    device_slots: int,
    min_score: float = 0.05,
    hot: frozenset[str] = frozenset(),
    resident: Sequence[str] = (),
) -> list[tuple[str, bool]]:
    """(adapter, spread) pairs to pre-load this interval, most likely first: the adapters whose
    probability of a request next interval is at least `min_score`, at most `device_slots`.

    `resident` lists the adapters on the replicas' devices (one entry per copy). A pre-load into
    a full pool evicts an adapter, so one that needs a copy (not resident, or hot and to spread)
    is planned only while a slot is free or a resident adapter is less likely than it, and each
    such pre-load uses up the weakest of those: pre-loads never outnumber the evictions the
    forecast expects to pay off. (Which adapter a replica evicts is its own LRU choice; this
    bounds how many.)"""
    if device_slots <= 0:
        return []
    likely = sorted((p, a) for a, p in forecast.items() if p >= min_score)
    likely.reverse()
    on_device = set(resident)
    free = device_slots - len(resident)
    weaker = sorted(forecast.get(a, 0.0) for a in resident)  # displaced from the weakest up
    displaced = 0
    plan = []
    for p, a in likely[:device_slots]:
        spread = a in hot
        if spread or a not in on_device:
            if free > 0:
                free -= 1
            elif displaced < len(weaker) and weaker[displaced] < p:
                displaced += 1
            else:
                continue
        plan.append((a, spread))
    return plan


def prefetch_keep(forecast: Mapping[str, float], adapter: str) -> tuple[str, ...]:
    """The adapters a pre-load of `adapter` must not evict (a replica's own choice is LRU, which
    would as soon evict the likeliest adapter of all): those forecast at least as likely."""
    p = forecast.get(adapter, 0.0)
    return tuple(sorted(a for a, q in forecast.items() if q >= p and a != adapter))


def hot_adapters(rates: Mapping[str, float], hot_rate: float) -> frozenset[str]:
    """Adapters whose forecast request rate (per second) is at least `hot_rate`."""
    return frozenset(a for a, r in rates.items() if r >= hot_rate)


def replicas_needed(
    rate_per_s: float,
    service_s: float,
    target_ongoing: float,
    active_adapters: float,
    slots_per_replica: int,
    min_replicas: int,
    max_replicas: int,
) -> int:
    """Replicas for the forecast: max(rate x service / target, active adapters / slots), at
    least 1 when any demand is expected, within [min_replicas, max_replicas]."""
    if min(rate_per_s, service_s, active_adapters) < 0 or target_ongoing <= 0 or slots_per_replica <= 0:
        raise ValueError("rates, times and counts must be >= 0, target_ongoing and slots_per_replica > 0")
    by_rate = math.ceil(rate_per_s * service_s / target_ongoing - 1e-9)
    # Below half an adapter expected active, the forecast expects nothing: zero is allowed.
    by_slots = math.ceil(active_adapters / slots_per_replica - 1e-9) if active_adapters >= 0.5 else 0
    need = max(by_rate, by_slots, 1 if rate_per_s > 0 else 0)
    return max(min_replicas, min(max_replicas, need))
