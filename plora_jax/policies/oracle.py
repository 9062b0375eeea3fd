"""`oracle` and `causal_oracle`: they know every future arrival (benchmarks only), the bounds a
forecaster is measured against.

Given the whole arrival schedule `(time, adapter)` on the policy clock (times relative to
`origin`, which the replay sets when it starts), the oracle ranks adapters by their next *use*,
not their next arrival: the adapters of queued requests first, in queue order (admission is in
arrival order, so a request deep in the queue runs after every one ahead of it and after no
later arrival), then those arriving later, soonest first. Under a long queue the two orders
differ: an adapter arriving in a second is used after the whole queue. It prefetches the queued
adapters and those arriving within `horizon_s` onto the device as far as they fit (the next
ones into the host cache), fetches every other adapter it knows will come into the node cache
as far as it has room, and evicts the adapter used furthest in the future first (Belady's
rule); adapters never requested again rank lowest.

`causal_oracle` is the same with one rule more: it never holds an adapter before that
adapter's first arrival. No forecaster can know an adapter it has never seen, so this is the
bound for a forecaster of returning demand, which is what the paper's LSTM is.
"""

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

    def knows(self, adapter: str, now: float) -> bool:
        """Whether it may act on `adapter`'s future at `now` (always: it is clairvoyant)."""
        return True

    def next_arrival(self, adapter: str, now: float) -> float | None:
        """Seconds from `now` to the adapter's next arrival (an arrival at `now` counts), or None."""
        times = self._times.get(adapter)
        if not times or not self.knows(adapter, now):
            return None
        i = bisect.bisect_left(times, now - self.origin)
        return times[i] - (now - self.origin) if i < len(times) else None

    def expected_demand(self, now: float, horizon_s: float) -> float:
        """Arrivals (it knows them) within `horizon_s` of `now`."""
        waits = (self.next_arrival(a, now) for a in self._times)
        return float(sum(1 for w in waits if w is not None and w <= horizon_s))

    def next_uses(self, view: PoolView) -> tuple[list[str], dict[str, float]]:
        """Every adapter it expects to be used, soonest use first, and the seconds to the next
        arrival of those not queued."""
        queued = [n for n in dict.fromkeys(view.queued) if n in view.adapter_bytes]
        in_queue, waits = set(queued), {}
        for adapter in self._times:
            if adapter in view.adapter_bytes and adapter not in in_queue:
                wait = self.next_arrival(adapter, view.now)
                if wait is not None:
                    waits[adapter] = wait
        return queued + sorted(waits, key=waits.get), waits

    def decide(self, view: PoolView) -> Decision:
        order, waits = self.next_uses(view)
        soon = [a for a in order if waits.get(a, 0.0) <= self.horizon_s]  # queued ones wait 0
        later = [a for a in order if waits.get(a, 0.0) > self.horizon_s]
        wanted, host, disk = fill_tiers(soon, view, later)
        # Sooner used: kept longer; every expected adapter above those never used again (0).
        priority = {a: float(len(order) - i) for i, a in enumerate(order)}
        return Decision(device=[a for a in wanted if a not in view.on_device], host=host, disk=disk, priority=priority)


class CausalOracle(Oracle):
    name = "causal_oracle"

    def knows(self, adapter: str, now: float) -> bool:
        """Only adapters that have arrived at least once by `now`."""
        times = self._times.get(adapter)
        return bool(times) and times[0] <= now - self.origin
