"""The serverless layer: function instances that start on demand, stop after a keep-alive, and
receive requests by adapter affinity.

An instance is one engine holding the base model. Scaling rules (what a serverless platform
does for one function whose variants are the adapters):

- Routing (`pick_instance`): among instances that are up or starting and have room (fewer
  requests than `max_num_seqs`), prefer one that holds the request's adapter (committed or
  loading), then the least loaded. If none has room and fewer than `instances` exist, a new one
  starts (an instance cold start: `instance_start_s`, parameters from the Orbax cache and
  executables from the persistent compilation cache on the live engine); at the maximum, the
  least loaded instance queues the request.
- Scale to zero: an instance idle for `keep_alive_s` stops (its adapter pool goes with it) unless
  only `min_instances` remain.
- Pre-warming: each instance slot keeps its policy object across stops, as a control plane
  would, so the forecaster keeps running while the instance is down. At every interval, if a
  stopped slot's policy expects demand (`Policy.expected_demand`: the predictive policy's
  forecast probabilities summed, or the oracle's arrivals within one start time and interval), the
  instance starts ahead of it.

The routing rule is plain Python over `InstanceLoad` records, so a distributed host (a Ray
Serve deployment that scales to zero, with model multiplexing keyed by the adapter) can apply it
to its replicas; nothing here manages a cluster. `InstancePool` applies the rules to the
simulator's instances; the live replay applies routing, starts on demand and the keep-alive to
real engines (`live.replay_live` over a `live.Fleet`), without pre-warming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..policies import Policy
from .placement import ReplicaState, rank_replicas


@dataclass(frozen=True)
class InstanceLoad:
    index: int
    holds: bool  # the request's adapter is on the instance's device (or loading into it)
    load: int  # requests running or waiting there
    capacity: int  # requests it runs at once


def pick_instance(instances: Sequence[InstanceLoad]) -> int | None:
    """Affinity first, then the least loaded, among instances with room; None if all are full
    (`placement.rank_replicas`, which the Ray Serve router applies to its replicas too)."""
    open_ = [
        ReplicaState(i.index, frozenset({"a"}) if i.holds else frozenset(), queue=i.load)
        for i in instances
        if i.load < i.capacity
    ]
    return rank_replicas("a", open_)[0] if open_ else None


def keep_alive_expired(
    idle_since: float | None, now: float, keep_alive_s: float, active: int, min_instances: int
) -> bool:
    """Whether an instance idle since `idle_since` (None: busy) stops now: idle for the whole
    keep-alive, and more than `min_instances` instances active (0: scale to zero)."""
    if idle_since is None or now - idle_since < keep_alive_s - 1e-9:
        return False
    return active > min_instances


class InstancePool:
    """The serverless rules applied to a `Simulator`'s instances."""

    def __init__(self, sim, make_policy: Callable[[], Policy], make_instance: Callable):
        # make_instance(sim, slot, policy): one simulated engine (the simulator's SimInstance;
        # given, not imported, so that this module of rules depends on no simulator)
        self.sim, self.make_policy, self.make_instance = sim, make_policy, make_instance
        self.instances: list = []  # SimInstance per slot (a restarted slot gets a fresh one)
        self.policies: list[Policy] = []  # per slot, kept across stops
        self.starts = 0  # instance cold starts (not counting those warm at time 0)
        self.prewarms = 0  # starts triggered by a forecast rather than a request
        self.stops = 0  # instances stopped after the keep-alive
        self.start_waits: list[float] = []  # seconds requests waited for their instance to start

    def active(self) -> list:
        return [i for i in self.instances if not i.stopped]

    def up(self, now: float) -> list:
        return [i for i in self.active() if i.ready_at <= now]

    def _launch(self, slot: int | None, now: float, delay: float):
        if slot is None:
            slot = len(self.instances)
            self.policies.append(self.make_policy())
            self.instances.append(None)
        inst = self.make_instance(self.sim, slot, self.policies[slot])
        inst.ready_at = now + delay
        inst.idle_since = inst.ready_at
        self.instances[slot] = inst
        if delay > 0:
            self.starts += 1
            self.sim.push(inst.ready_at, "instance_ready", slot)
        return inst

    def start(self, now: float) -> None:
        for _ in range(self.sim.config.min_instances):
            self._launch(None, now, 0.0)

    def route(self, request, now: float) -> None:
        cfg = self.sim.config
        active = self.active()
        adapter = request.trace.adapter
        loads = [InstanceLoad(i.index, i.holds(adapter), i.load, cfg.engine.max_num_seqs) for i in active]
        index = pick_instance(loads)
        if index is None and len(active) < cfg.instances:
            stopped = [i.index for i in self.instances if i.stopped]
            inst = self._launch(stopped[0] if stopped else None, now, self.sim.calibration.instance_start_s)
        elif index is None:
            inst = self.instances[min(loads, key=lambda i: (i.load, i.index)).index]
        else:
            inst = self.instances[index]
        request.instance = inst.index
        if inst.ready_at > now:
            request.instance_wait = inst.ready_at - now
            self.start_waits.append(request.instance_wait)
        inst.add(self.sim.engine_request(request, now), now)
        if inst.ready_at <= now:
            inst.decide(now)
            inst.wake(now)

    def ready(self, slot: int, now: float) -> None:
        inst = self.instances[slot]
        if inst.stopped or inst.ready_at > now:
            return
        inst.decide(now)
        inst.wake(now)
        if not inst.busy():
            self.idle(inst, now)

    def idle(self, inst, now: float) -> None:
        if len(self.active()) > self.sim.config.min_instances:
            self.sim.push(now + self.sim.config.keep_alive_s, "keep_alive", inst.index, inst)

    def expire(self, slot: int, now: float) -> None:
        inst, cfg = self.instances[slot], self.sim.config
        busy = inst.busy()
        if inst.stopped:
            return
        idle_since = None if busy else inst.idle_since
        if keep_alive_expired(idle_since, now, cfg.keep_alive_s, len(self.active()), cfg.min_instances):
            inst.at(now)  # its pool's occupancy counts until the stop
            inst.stopped = True
            self.stops += 1

    def interval(self, now: float) -> None:
        cfg, cal = self.sim.config, self.sim.calibration
        for slot, policy in enumerate(self.policies):
            self.sim.forecast_step(policy)
            inst = self.instances[slot]
            if not inst.stopped and inst.ready_at <= now:
                inst.decide(now)
                inst.wake(now)
            elif (
                inst.stopped
                and cfg.prewarm
                and len(self.active()) < cfg.instances
                and policy.expected_demand(now, cal.instance_start_s + self.sim.interval_s) >= 0.5
            ):
                self._launch(slot, now, cal.instance_start_s)
                self.prewarms += 1
