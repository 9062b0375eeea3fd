"""`oracle`: knows every future arrival (benchmarks only): the upper bound a forecaster can reach.

Given the whole arrival schedule `(time, adapter)` on the policy clock (times relative to
`origin`, which the replay sets when it starts), it prefetches the adapters whose next request
falls within `horizon_s`, soonest first, as many as fit the device pool (the next ones into
the host cache), fetches every other adapter it knows will come into the node cache, soonest
first, as many as fit it (a clairvoyant's disk tier: the bound), and evicts the adapter whose
next request is furthest away first (Belady's rule). Adapters never requested again rank
lowest."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from .base import Decision, Policy, PoolView, fill_tiers


class Oracle(Policy):
    name = "oracle"

    def __init__(self, arrivals: Iterable[tuple[float, str]], interval_s: float = 60.0, horizon_s: float | None = None):
        super().__init__(interval_s)
        self.horizon_s = horizon_s if horizon_s is not None else 2.0 * interval_s
        self.origin = 0.0
        self._times: dict[str, list[float]] = {}
        for t, adapter in sorted(arrivals, key=lambda a: a[0]):
            self._times.setdefault(adapter, []).append(float(t))

    def set_origin(self, origin: float) -> None:
        """Arrival times count from `origin` on the policy clock (e.g. the replay's start)."""
        self.origin = origin

    def next_arrival(self, adapter: str, now: float) -> float | None:
        """Seconds from `now` to the adapter's next arrival (an arrival at `now` counts), or None."""
        times = self._times.get(adapter)
        if not times:
            return None
        i = bisect.bisect_left(times, now - self.origin)
        return times[i] - (now - self.origin) if i < len(times) else None

    def expected_demand(self, now: float, horizon_s: float) -> float:
        """Arrivals (it knows them) within `horizon_s` of `now`."""
        waits = (self.next_arrival(a, now) for a in self._times)
        return float(sum(1 for w in waits if w is not None and w <= horizon_s))

    def decide(self, view: PoolView) -> Decision:
        upcoming = {}
        for adapter in self._times:
            if adapter in view.adapter_bytes:
                wait = self.next_arrival(adapter, view.now)
                if wait is not None:
                    upcoming[adapter] = wait
        queued = [n for n in dict.fromkeys(view.queued) if n in view.adapter_bytes]
        queued_set = set(queued)
        soon = sorted((a for a, w in upcoming.items() if w <= self.horizon_s and a not in queued_set), key=upcoming.get)
        known = queued_set | set(soon)
        later = sorted((a for a in upcoming if a not in known), key=upcoming.get)
        wanted, host, disk = fill_tiers(queued + soon, view, later)
        priority = {a: 1.0 / (1.0 + w) for a, w in upcoming.items()}  # nearer next use: kept longer
        for a in queued:
            priority[a] = 2.0
        return Decision(device=[a for a in wanted if a not in view.on_device], host=host, disk=disk, priority=priority)
