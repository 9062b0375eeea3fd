"""The one interface every adapter-residency policy implements, and the snapshot it sees.

A policy watches the request log (`observe`: one call per arriving request, with its adapter and
the time) and, at every arrival and every interval, looks at a `PoolView` of the tiers and
returns a `Decision`: what to prefetch onto the device, into the host cache and into the
node cache (from the adapter store), what to drop now, and an eviction priority. The engine
applies the decision on its loop thread; the policy never touches engine state, so the same
policy object drives the live engine and the replay simulator (issue 8) alike. Policies read
time only from `PoolView.now` and `observe`'s `now`: with a simulated clock they behave exactly
as with the wall clock.

Eviction priority: when room is needed, unpinned adapters are evicted lowest priority first,
least recently used first among equals; an adapter absent from `Decision.priority` has
priority 0. A prefetch may only evict adapters of strictly lower priority than the one it
brings in, so a policy cannot thrash by prefetching what it ranks below what is resident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolView:
    """What a policy sees of the tiers at one moment (plain values, built by the loop)."""

    now: float  # seconds on the policy clock (the engine's: time.monotonic)
    registered: tuple[str, ...]  # every adapter_id that can be served
    on_device: frozenset[str]  # committed to the device pool or loading into it
    on_host: frozenset[str]  # with a page-laid-out copy in the host cache
    on_disk: frozenset[str]  # on the node's disk: a local folder, or a remote adapter in the node cache
    pinned: frozenset[str]  # in use by admitted requests: never evicted
    queued: tuple[str, ...]  # adapters of waiting requests, in queue order (repeats kept)
    adapter_bytes: Mapping[str, int]  # device bytes one adapter occupies (its pages or region)
    device_bytes: int  # what adapters can hold on the device (one KV budget: its free and adapter-held blocks)
    device_slots: int  # adapters the device can hold at once (page-table rows)
    host_bytes: int  # byte budget of the host cache
    disk_bytes: int  # byte budget of the node cache (remote adapters on this node's disk)


@dataclass
class Decision:
    """A policy's answer; every field may be empty."""

    device: list[str] = field(default_factory=list)  # prefetch onto the device, most wanted first
    host: list[str] = field(default_factory=list)  # prefetch into the host cache, most wanted first
    disk: list[str] = field(default_factory=list)  # fetch from the store into the node cache, most wanted first
    evict: list[str] = field(default_factory=list)  # drop from the device now (if unpinned)
    priority: dict[str, float] = field(default_factory=dict)  # eviction priority (lowest goes first)


class Policy:
    """Base class: load on demand, evict least recently used, prefetch nothing."""

    name = "base"
    free_when_unused = False  # evict an adapter as soon as its last request finishes
    sync_loads = False  # a step waits for a missing adapter's load (S-LoRA), whatever the engine's adapter_loads

    def __init__(self, interval_s: float = 60.0):
        if interval_s <= 0:
            raise ValueError(f"policy interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s  # how often `decide` runs without an arrival

    def observe(self, adapter: str | None, now: float) -> None:
        """One arriving request (adapter None: the base model)."""

    def forget(self, adapter: str) -> None:
        """`adapter` was unregistered: drop what this policy keeps about it (state per adapter
        name must not grow with every name ever served)."""

    def decide(self, view: PoolView) -> Decision:
        return Decision()

    def expected_demand(self, now: float, horizon_s: float) -> float:
        """Requests this policy expects within `horizon_s` of `now` (what pre-warming and
        autoscaling read); 0 for a policy that does not forecast."""
        return 0.0

    def step(self) -> None:
        """Advance a forecaster one interval (a simulator calls this once per interval; a live
        engine's forecasting policy runs it on its own thread); nothing for other policies."""

    def start(self) -> None:
        """Start background work (the predictor thread); called when an engine adopts the policy."""

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the background work `start` began is ready to answer (a forecaster's first
        compile done); True when ready. Replays call it before their clock starts."""
        return True

    def close(self) -> None:
        """Stop background work."""

    def stats(self) -> dict:
        return {}


def fill_tiers(ranked: list[str], view: PoolView, later: list[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """Tier by tier, fastest first, what a ranking of adapters (most wanted first) wants there:
    (the device's wanted set, resident or not; the host reads; the node-cache fetches). The
    device takes the greedy prefix that fits its bytes and slots; the host cache the next ones
    not on the host that fit its budget; the node cache the rest, then `later` (wanted on the
    node only), those on no faster tier nor its own, as far as its budget goes. So the forecast
    reaches as deep as there is room: its horizon (an interval, a minute) is longer than any
    tier's load time, a store fetch included, so time never stops it first."""
    wanted = rank_to_fit(ranked, view, view.device_bytes, view.device_slots)
    chosen = set(wanted)
    rest = [n for n in ranked if n not in chosen and n not in view.on_host]
    host = rank_to_fit(rest, view, view.host_bytes, len(rest))
    chosen.update(host)
    placed = view.on_device | view.on_host | view.on_disk
    fetch = [n for n in dict.fromkeys((*rest, *later)) if n not in chosen and n not in placed]
    return wanted, host, rank_to_fit(fetch, view, view.disk_bytes, len(fetch))


def rank_to_fit(names, view: PoolView, budget_bytes: int, max_count: int) -> list[str]:
    """Greedily, in the order of `names`, the adapters that fit `budget_bytes` and `max_count`
    (one too large for what is left is skipped; smaller ones after it may still fit)."""
    chosen, used = [], 0
    for name in names:
        if len(chosen) >= max_count:
            break
        size = view.adapter_bytes.get(name, 0)
        if used + size <= budget_bytes:
            chosen.append(name)
            used += size
    return chosen
