"""The residency core: where every registered adapter lives, and every move between tiers.

Host state only (plain Python, no jax), owned by one thread: the engine loop live, or the
simulator. It takes a clock and a `Transfer`, so the same code runs live (`time.perf_counter`,
the transfer thread) and simulated (a `VirtualClock`, a `SimulatedTransfer` whose durations
come from a cost profile). `manager.LoraManager` adds the device side: staging and the donated
commit into the device pool.

Tiers: the registry (disk), the host cache (`host_cache.HostCache`) and the page allocator
(`page_allocator.PagePool`, the device pool's bookkeeping).

- `arrive` (a request reaches the engine): the hit and cold-start counters count it here, before
  any decision its arrival triggers, so a load started because it came is still its cold start.
- `acquire` (a request's admission attempt): the adapter's slot, pinned, if it is on the device;
  else None, with a demand load started (pages reserved now, so placement is this thread's
  decision) or already in flight. A loading adapter is pinned, so loads cannot evict each other.
- `apply` (a policy `Decision`): install its priorities (they order both tiers' evictions),
  drop what it evicts, start device prefetches (which may only displace adapters of strictly
  lower priority) and host reads, at most `max_prefetch_inflight` of each in flight.
- `collect` (every step boundary): take back finished jobs. A job whose placement was removed
  meanwhile (its pages possibly reused) is dropped, never committed (`stale_dropped`); a failed
  demand load is reported so its requests fail. The jobs to commit are returned to the owner.
- `release` (a request ends): unpin; under `free_when_unused` (reactive, and the fallback when
  a forecaster fails) the adapter is freed once nobody uses or waits for it. An adapter removed
  while requests run keeps its pages until the last of them finishes.

Counters and ratios are `plora_jax.metrics`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from types import MappingProxyType

from ..metrics import ADAPTER_COUNTERS, adapter_mem_util, adapter_ratios
from ..policies import Decision, PoolView
from .host_cache import HostCache, HostCopy
from .page_allocator import PagePool
from .registry import AdapterEntry, Registry
from .transfer import DEMAND, HOST, PREFETCH, Job, Transfer

# A removed adapter's placement, while running requests still read it, is kept under its name
# plus this and a number: no registered name contains a NUL, so the name is free for a new version.
RETIRED = "\0removed-"


class Residency:
    def __init__(
        self,
        registry: Registry,
        pages: PagePool,
        host: HostCache,
        transfer: Transfer,
        clock: Callable[[], float],
        max_prefetch_inflight: int = 2,
    ):
        self.registry, self.pages, self.host, self.transfer, self.clock = registry, pages, host, transfer, clock
        self.max_prefetch_inflight = max_prefetch_inflight
        self.priority: dict[str, float] = {}  # eviction priority from the policy's last decision
        pages.priority = host.priority = lambda name: self.priority.get(name, 0.0)
        self.free_when_unused = False  # reactive: free an adapter when its last request finishes
        self.counters = dict.fromkeys(ADAPTER_COUNTERS, 0)
        self.load_seconds_total = 0.0  # committed device loads, from queued to committed
        # The transfer's own time on committed device loads (no queueing) and their device
        # bytes, for copies staged from the host cache and for those read from the folder first.
        self.transfer_s = {"host": 0.0, "disk": 0.0}
        self.transfer_bytes = {"host": 0, "disk": 0}
        self.committed_pages = 0  # pages of the device jobs handed back to commit, in all
        self.ready_at: dict[str, float] = {}  # when each adapter's last device load was handed back to commit
        self.loading: dict[str, Job] = {}  # device loads in flight
        self.host_jobs: dict[str, Job] = {}  # host-only reads in flight
        self.prefetched: set[str] = set()  # placements made by a prefetch and not used yet
        self.removing: set[str] = set()  # retired keys of removed adapters that running requests still use
        self._seq = itertools.count()
        # Occupancy integrated over time (bytes x seconds), brought up to date before every
        # change of the pool: their ratio over a run is its time-averaged memory utilisation.
        self.live_byte_seconds = self.reserved_byte_seconds = 0.0
        self._occupancy_at = clock()

    @property
    def entries(self) -> dict[str, AdapterEntry]:
        return self.registry.entries

    @property
    def page_bytes(self) -> int:
        return self.registry.page_bytes

    # --- registry -----------------------------------------------------------------------
    def insert(self, entry: AdapterEntry, copy: HostCopy | None = None) -> AdapterEntry:
        """Register a prepared entry (and its host copy, if it was read)."""
        self.registry.insert(entry)
        if copy is not None:
            self.host.put(entry.name, copy, self._busy())
        return entry

    def remove(self, name: str) -> str | None:
        """Unregister `name`. Its device pages are freed now, or, while running requests still
        read them, when the last of those finishes: the placement is then kept under a retired
        key (returned; the caller moves those requests to it), so that the name is free at once
        for a new version (vLLM's unload-then-load). A load in flight becomes stale and is dropped."""
        if name not in self.entries:
            raise ValueError(f"adapter {name!r} is not registered")
        if self.loading.pop(name, None) is not None:
            self.pages.unpin(name)  # the load's own pin
        retired = None
        res = self.pages.get(name)
        if res is not None:
            if res.pins:
                retired = f"{name}{RETIRED}{next(self._seq)}"
                self.pages.rename(name, retired)
                self.removing.add(retired)
            else:
                self._evict(name)
        self.host.drop(name)
        self.host_jobs.pop(name, None)
        self.prefetched.discard(name)
        self.priority.pop(name, None)
        self.ready_at.pop(name, None)
        del self.entries[name]
        return retired

    def residency(self, name: str) -> str:
        if name in self.loading:
            return "loading"
        if self.pages.get(name) is not None:
            return "device"
        return "host" if name in self.host else "disk"

    def describe(self) -> list[dict]:
        return [
            {
                "name": name,
                "path": entry.source or str(entry.path),
                "rank": entry.rank,
                "target_modules": list(entry.target_modules),
                "residency": self.residency(name),
                "num_pages": entry.num_pages,
                "bytes": entry.live_bytes,
            }
            for name, entry in self.entries.items()
        ]

    # --- residency ----------------------------------------------------------------------
    def is_loading(self, name: str) -> bool:
        return name in self.loading

    def arrive(self, name: str) -> bool:
        """Count a request for `name` as it reaches the engine (a hit or a cold start, before any
        decision its arrival triggers); True if the adapter is on the device."""
        on_device = self.pages.get(name) is not None and name not in self.loading
        self.counters["device_hits" if on_device else "cold_starts"] += 1
        if not on_device and name in self.host:
            self.counters["host_hits"] += 1
        if name in self.prefetched:
            self.prefetched.discard(name)
            self.counters["prefetch_used"] += 1
            self.counters["prefetch_hits"] += on_device  # the prefetch finished in time
        return on_device

    def acquire(self, name: str, first: bool = True) -> int | None:
        """The adapter's slot, pinned, if it is on the device; else None, with its load started
        (or in flight). `first`: count the request too (`arrive`), for callers that did not."""
        if first:
            self.arrive(name)
        res = self.pages.get(name)
        on_device = res is not None and name not in self.loading
        if on_device:
            self.pages.pin(name)
            return res.slot
        if name not in self.loading:
            self.start_load(name)
        return None

    def start_load(
        self, name: str, prefetch: bool = False, evict_below: float | None = None, keep: Collection[str] = ()
    ) -> bool:
        """Place `name` in the pool and queue its transfer; False if it does not fit (nothing
        evictable, or with `evict_below` nothing of lower priority, or all else in `keep`)."""
        self._tick()
        entry = self.entries[name]
        placed = self.pages.allocate(name, entry.num_pages, entry.live_bytes, evict_below, keep)
        if placed is None:
            return False
        res, evicted = placed
        for other in evicted:
            self._evicted(other)
        kind = PREFETCH if prefetch else DEMAND
        job = self._job(kind, name, entry, slot=res.slot, pages=tuple(res.pages), generation=res.generation)
        if prefetch:
            self.prefetched.add(name)
            self.counters["prefetch_issued"] += 1
        self.loading[name] = job
        self.pages.pin(name)  # a loading adapter is never evicted to make room (that would thrash)
        self.transfer.submit(job)
        return True

    def _job(self, kind: int, name: str, entry: AdapterEntry, **placement) -> Job:
        source = self.host.get(name)
        return Job(kind, name, entry, started=self.clock(), seq=next(self._seq), source=source, **placement)

    def release(self, name: str, wanted: bool = False) -> None:
        """Unpin `name`; `wanted`: a waiting request needs it (reactive freeing skips it)."""
        self.pages.unpin(name)
        res = self.pages.get(name)
        if res is None or res.pins or name in self.loading:
            return
        if name in self.removing:
            self.removing.discard(name)
            self._evict(name)
        elif self.free_when_unused and not wanted:
            self._evict(name)

    def _evict(self, name: str) -> None:
        self._tick()
        self.pages.evict(name)
        self._evicted(name)

    def _evicted(self, name: str) -> None:
        self.loading.pop(name, None)  # a copy still in flight is now stale
        if name in self.prefetched:
            self.prefetched.discard(name)
            self.counters["prefetch_wasted"] += 1

    # --- policy decisions ---------------------------------------------------------------
    def view(self, now: float, queued: tuple[str, ...]) -> PoolView:
        pinned = frozenset(n for n, r in self.pages.resident.items() if r.pins)
        return PoolView(
            now=now,
            registered=tuple(self.entries),
            on_device=frozenset(self.pages.resident),
            on_host=frozenset(self.host.copies),
            pinned=pinned,
            queued=queued,
            adapter_bytes=MappingProxyType({n: e.device_bytes for n, e in self.entries.items()}),
            device_bytes=(self.pages.num_pages - 1) * self.page_bytes,
            device_slots=self.pages.usable_slots,
            host_bytes=self.host.budget,
        )

    def apply(self, decision: Decision) -> None:
        """Install the decision's priorities, drop what it evicts, start what it prefetches."""
        self.priority = {n: float(p) for n, p in decision.priority.items() if n in self.entries}
        for name in decision.evict:
            res = self.pages.get(name)
            if res is not None and not res.pins and name not in self.loading:
                self._evict(name)
        inflight = sum(job.kind == PREFETCH for job in self.loading.values())
        for name in decision.device:
            if inflight >= self.max_prefetch_inflight:
                break
            if name not in self.entries or self.pages.get(name) is not None:
                continue
            if self.start_load(name, prefetch=True, evict_below=self.priority.get(name, 0.0)):
                inflight += 1
        for name in decision.host:
            if len(self.host_jobs) >= self.max_prefetch_inflight:
                break
            entry = self.entries.get(name)
            if entry is None or name in self.host or name in self.loading or name in self.host_jobs:
                continue
            if self.host.room(entry.host_bytes, self.priority.get(name, 0.0), self._busy()):
                job = self._job(HOST, name, entry)
                self.host_jobs[name] = job
                self.counters["host_prefetch_issued"] += 1
                self.transfer.submit(job)

    def _busy(self) -> set[str]:
        return self.loading.keys() | self.host_jobs.keys()

    # --- finished transfers -------------------------------------------------------------
    def collect(self, block: bool = False) -> tuple[list[Job], list[tuple[str, BaseException]]]:
        """Take back the finished transfers (at a step boundary): the device jobs to commit, in
        order, and the failed demand loads. With `block`, wait for one if any is in flight."""
        ready, failures = [], []
        while True:
            job = self.transfer.finished(block=block and bool(self.loading or self.host_jobs))
            if job is None:
                return ready, failures
            block = False
            current_entry = self.entries.get(job.name) is job.entry
            if job.error is not None:
                self.counters["load_failures"] += 1
                job.entry.error = job.error
            elif current_entry:
                self.counters["bytes_disk_to_host"] += job.bytes_disk
                copy = job.read or job.source
                if copy is not None:  # the copy read (or used) stays if the budget allows
                    self.host.put(job.name, copy, self._busy() - {job.name})
            if job.kind == HOST:
                if self.host_jobs.get(job.name) is job:
                    del self.host_jobs[job.name]
                continue
            res = self.pages.get(job.name)
            current = current_entry and res is not None and res.generation == job.generation
            if current:
                self.loading.pop(job.name, None)
                self.pages.unpin(job.name)
            if job.error is not None:
                if current:
                    self._evict(job.name)
                    failures.append((job.name, job.error))
                continue
            if not current:
                self.counters["stale_dropped"] += 1  # placement evicted meanwhile: never commit
                continue
            self.counters["bytes_host_to_device"] += job.bytes_device
            job.entry.load_s = self.clock() - job.started
            job.entry.error = None
            self.load_seconds_total += job.entry.load_s
            tier = "host" if job.source is not None else "disk"
            self.transfer_s[tier] += job.busy_s
            self.transfer_bytes[tier] += job.bytes_device
            self.committed_pages += len(job.pages)
            self.ready_at[job.name] = self.clock()
            ready.append(job)

    def collect_for(self, name: str) -> tuple[list[Job], list[tuple[str, BaseException]]]:
        """Block until `name`'s load is finished or failed (for calls such as `logits`)."""
        ready, failures = [], []
        while name in self.loading:
            more, failed = self.collect(block=True)
            ready += more
            failures += failed
        return ready, failures

    def drain(self) -> list[Job]:
        """Wait for every transfer in flight; returns the device jobs to commit."""
        ready = []
        while self.loading or self.host_jobs:
            ready += self.collect(block=True)[0]
        return ready

    def clear(self) -> None:
        """Empty the device pool and the host cache, adapters staying registered (benchmarks
        replay one policy after another from the same cold state). Nothing may be in use or in
        flight (`drain` first)."""
        pinned = [n for n, r in self.pages.resident.items() if r.pins and n not in self.loading]
        if pinned:
            raise RuntimeError(f"adapters in use: {pinned}")
        if self.loading or self.host_jobs:
            raise RuntimeError("transfers in flight: drain() first")
        for name in list(self.pages.resident):
            self._evict(name)
        self.host.clear()
        self.prefetched.clear()
        self.priority = {}

    def drop_host_copy(self, name: str) -> None:
        """Forget `name`'s host copy (its next load reads the folder); benchmarks and tests."""
        self.host.drop(name)

    # --- accounting ---------------------------------------------------------------------
    def _tick(self) -> None:
        now = self.clock()
        dt = now - self._occupancy_at
        if dt > 0:
            self.live_byte_seconds += self.pages.live_bytes * dt
            self.reserved_byte_seconds += self.pages.pages_used * self.page_bytes * dt
        self._occupancy_at = max(now, self._occupancy_at)

    def memory_util(self) -> float:
        """`plora_jax.metrics.adapter_mem_util` of the pool now."""
        return adapter_mem_util(self.pages.live_bytes, self.pages.pages_used * self.page_bytes)

    def check(self) -> None:
        """Invariants (tests): the page pool's and the host cache's accounting, and that every
        placement in flight is a resident, pinned adapter."""
        self.pages.check()
        self.host.check()
        assert set(self.host.copies) <= set(self.entries)
        assert set(self.loading) <= set(self.pages.resident) and not self.removing & set(self.entries)
        assert all(self.pages.get(n).pins >= 1 for n in self.loading)
        assert all(r.pins >= 0 for r in self.pages.resident.values())

    def stats(self) -> dict:
        self._tick()
        self.counters["host_evictions"] = self.host.evictions
        stats = {
            "adapters_registered": len(self.entries),
            "adapters_on_device": len(self.pages.resident) - len(self.removing),
            "adapters_retiring": len(self.removing),  # removed, their pages still read by running requests
            "adapters_on_host": len(self.host),
            "adapter_pages_used": self.pages.pages_used,
            "adapter_pages_total": self.pages.num_pages - 1,
            "adapter_page_bytes": self.page_bytes,
            "adapter_live_bytes": self.pages.live_bytes,
            "adapter_reserved_bytes": self.pages.pages_used * self.page_bytes,
            "adapter_pool_bytes": self.pages.num_pages * self.page_bytes,
            "adapter_live_byte_s": self.live_byte_seconds,
            "adapter_reserved_byte_s": self.reserved_byte_seconds,
            "host_cache_bytes": self.host.used,
            "host_cache_budget": self.host.budget,
            "adapter_loads": self.pages.loads,
            "adapter_evictions": self.pages.evictions,
            "adapter_load_s_total": self.load_seconds_total,
            **{f"adapter_transfer_s_from_{tier}": t for tier, t in self.transfer_s.items()},
            **{f"adapter_transfer_bytes_from_{tier}": n for tier, n in self.transfer_bytes.items()},
            "adapters_loading": len(self.loading),
            "adapters_pinned": sum(1 for r in self.pages.resident.values() if r.pins),
            **self.counters,
            "lora_layout": self.pages.layout,
        }
        return stats | adapter_ratios(stats)
