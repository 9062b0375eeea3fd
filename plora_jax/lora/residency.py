"""The residency core: where every registered adapter lives, and every move between tiers.

Host state only (plain Python, no jax), owned by one thread: the engine loop live, or the
simulator. It takes a clock and a `Transfer`, so the same code runs live (`time.perf_counter`,
the transfer thread) and simulated (a `VirtualClock`, a `SimulatedTransfer` whose durations
come from a cost profile). `manager.LoraManager` adds the device side: staging and the donated
commit into the device pool.

Tiers, slowest first: the adapter store (remote adapters, `AdapterEntry.source`), the node's
disk (local folders, and the remote adapters in the node cache: `disk`, a byte-budgeted
`HostCache` of sizes only, this owner's view of the shared `node_cache.NodeCache`, whose
evictions by other processes it does not see), the host cache (`host_cache.HostCache`) and the
page allocator (`page_allocator.PagePool`, the device pool's bookkeeping). `tier` names where
an adapter is (`metrics.TIERS`).

- `arrive` (a request reaches the engine): the hit and cold-start counters count it here, before
  any decision its arrival triggers, so a load started because it came is still its cold start.
- `acquire` (a request's admission attempt): the adapter's slot, pinned, if it is on the device;
  else None, with a demand load started (pages reserved now, so placement is this thread's
  decision) or already in flight. A loading adapter is pinned, so loads cannot evict each other.
- `apply` (a policy `Decision`): install its priorities (they order every tier's evictions),
  drop what it evicts, start device prefetches (which may only displace adapters of strictly
  lower priority), host reads and fetches into the node cache, at most
  `max_prefetch_inflight` of each in flight.
- `collect` (every step boundary): take back finished jobs. A job whose placement was removed
  meanwhile (its pages possibly reused) is dropped, never committed (`stale_dropped`); a failed
  demand load is reported so its requests fail. The jobs to commit are returned to the owner.
- `release` (a request ends): unpin; under `free_when_unused` (reactive, and the fallback when
  a forecaster fails) the adapter is freed once nobody uses or waits for it. An adapter removed
  while requests run keeps its pages until the last of them finishes.
- `reclaim` (the scheduler is short of KV blocks, with one budget for KV and adapters): evict
  unpinned adapters, lowest priority first, so the KV cache gets their blocks (`kv_reclaims`).

Counters and ratios are `plora_jax.metrics`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from types import MappingProxyType

from ..metrics import (
    ADAPTER_COUNTERS,
    LINKS,
    TIER_COLD_COUNTER,
    TRANSFER_SOURCES,
    LinkFit,
    adapter_mem_util,
    adapter_ratios,
)
from ..policies import Decision, PoolView
from .host_cache import HostCache, HostCopy
from .page_allocator import PagePool
from .registry import AdapterEntry, Registry
from .transfer import DEMAND, DISK, HOST, PREFETCH, Job, Transfer

# A removed adapter's placement, while running requests still read it, is kept under its name
# plus this and a number: no registered name contains a NUL, so the name is free for a new version.
RETIRED = "\0removed-"


class Residency:
    def __init__(
        self,
        registry: Registry,
        pages: PagePool,
        host: HostCache,
        disk: HostCache,
        transfer: Transfer,
        clock: Callable[[], float],
        max_prefetch_inflight: int = 2,
    ):
        self.registry, self.pages, self.host, self.disk = registry, pages, host, disk
        self.transfer, self.clock = transfer, clock
        self.max_prefetch_inflight = max_prefetch_inflight
        self.priority: dict[str, float] = {}  # eviction priority from the policy's last decision
        pages.priority = host.priority = disk.priority = lambda name: self.priority.get(name, 0.0)
        self.free_when_unused = False  # reactive: free an adapter when its last request finishes
        self.counters = dict.fromkeys(ADAPTER_COUNTERS, 0)
        self.load_seconds_total = 0.0  # committed device loads, from queued to committed
        # The transfer's own time on committed device loads (no queueing) and their device
        # bytes, by where they staged from: the host cache, the node's disk, or the store first.
        self.transfer_s = dict.fromkeys(TRANSFER_SOURCES, 0.0)
        self.transfer_bytes = dict.fromkeys(TRANSFER_SOURCES, 0)
        self.committed_pages = 0  # pages of the device jobs handed back to commit, in all
        # The links this core's jobs measure alone: host-only reads, copies from the host cache.
        self.links = {link: LinkFit() for link in LINKS[1:]}  # LINKS[0], the store's: the node cache's
        self.ready_at: dict[str, float] = {}  # when each adapter's last device load was handed back to commit
        self.loading: dict[str, Job] = {}  # device loads in flight
        self.host_jobs: dict[str, Job] = {}  # host-only reads in flight
        self.disk_jobs: dict[str, Job] = {}  # fetches into the node cache only, in flight
        # Per tier, the adapters a prefetch brought there that no request has asked for yet.
        self.prefetched: set[str] = set()  # device placements
        self.prefetched_host: set[str] = set()
        self.prefetched_disk: set[str] = set()
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
        if entry.source is not None:  # `prepare` fetched it into the node cache
            self.disk.put(entry.name, self._disk_copy(entry), self._busy())
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
        for tier in (self.host, self.disk):
            tier.drop(name)
        for jobs in (self.host_jobs, self.disk_jobs):
            jobs.pop(name, None)
        for prefetched in (self.prefetched, self.prefetched_host, self.prefetched_disk):
            prefetched.discard(name)
        self.priority.pop(name, None)
        self.ready_at.pop(name, None)
        del self.entries[name]
        return retired

    def residency(self, name: str) -> str:
        """`tier`, or "loading" while a device load is in flight."""
        return "loading" if name in self.loading else self.tier(name)

    def tier(self, name: str) -> str:
        """The fastest tier holding `name` (`metrics.TIERS`; a device load in flight is not there yet)."""
        if self.pages.get(name) is not None and name not in self.loading:
            return "device"
        if name in self.host:
            return "host"
        return "disk" if self._on_node(name) else "store"

    def _on_node(self, name: str) -> bool:
        """On this node's disk: a local folder, or in the node cache as this owner last saw it."""
        return self.entries[name].source is None or name in self.disk

    @staticmethod
    def _disk_copy(entry: AdapterEntry) -> HostCopy:
        """The node cache's share of a remote adapter, as the disk tier counts it (sizes only)."""
        return HostCopy(None, None, entry.live_bytes)

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

    def arrive(self, name: str) -> str:
        """Count a request for `name` as it reaches the engine (a hit or a cold start, before any
        decision its arrival triggers, by the tier it was found in); the tier."""
        self._settle_prefetches()
        tier = self.tier(name)
        self.counters["device_hits" if tier == "device" else "cold_starts"] += 1
        if tier != "device":
            self.counters[TIER_COLD_COUNTER[tier]] += 1
        # Per tier: a prefetch there was used, and in time if the adapter was there or above.
        for prefix, prefetched, reached in (
            ("", self.prefetched, tier == "device"),
            ("host_", self.prefetched_host, tier in ("device", "host")),
            ("disk_", self.prefetched_disk, tier != "store"),
        ):
            if name in prefetched:
                prefetched.discard(name)
                self.counters[f"{prefix}prefetch_used"] += 1
                self.counters[f"{prefix}prefetch_hits"] += reached
        return tier

    def track_prefetches_from_now(self) -> None:
        """Count only prefetches issued from now on (a measured window after a warm-up): one
        issued before is neither used nor wasted inside the window, so precision stays <= 1."""
        self.prefetched.clear()
        self.prefetched_host.clear()
        self.prefetched_disk.clear()

    def _settle_prefetches(self) -> None:
        """Count as wasted the host and disk prefetches whose copy left its tier unused (the
        tiers drop copies as they trim; device prefetches are counted as they are evicted)."""
        for prefix, prefetched, tier, jobs, size in (
            ("host_", self.prefetched_host, self.host, self.host_jobs, lambda e: e.host_bytes),
            ("disk_", self.prefetched_disk, self.disk, self.disk_jobs, lambda e: self._disk_copy(e).nbytes),
        ):
            gone = {n for n in prefetched if n not in tier and n not in jobs}
            prefetched -= gone
            self.counters[f"{prefix}prefetch_wasted"] += len(gone)
            self.counters[f"{prefix}prefetch_wasted_bytes"] += sum(size(self.entries[n]) for n in gone)

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
        source = self.host.get(name) if kind != DISK else None
        pending = self.disk_jobs.get(name) if kind != DISK else None  # a fetch of it already in flight
        fetch = kind == DISK or (source is None and pending is None and not self._on_node(name))
        seq = next(self._seq)
        return Job(
            kind, name, entry, started=self.clock(), seq=seq, source=source, fetch=fetch, after=pending, **placement
        )

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

    def reclaim(self, num_blocks: int) -> bool:
        """Evict unpinned adapters until `num_blocks` KV blocks are free (`PagePool.reclaim`),
        device prefetches still loading too if idle adapters are not enough; whether they are.
        Without a unified budget adapters hold no blocks: False."""
        if self.pages.kv is None:
            return False
        self._tick()
        evicted = self.pages.reclaim(num_blocks)
        if not evicted and self.pages.kv.blocks.num_free < num_blocks:
            # Not enough from idle adapters: speculative loads in flight may go too (a copy still
            # landing is then stale and dropped), rather than a running request being preempted.
            prefetching = [n for n, job in self.loading.items() if job.kind == PREFETCH]
            for name in prefetching:
                self.pages.unpin(name)  # the load's own pin
            evicted = self.pages.reclaim(num_blocks)
            for name in prefetching:
                if name not in evicted:
                    self.pages.pin(name)
        for name in evicted:
            self.counters["kv_reclaims"] += 1
            self._evicted(name)
        return self.pages.kv.blocks.num_free >= num_blocks

    def _evict(self, name: str) -> None:
        self._tick()
        self.pages.evict(name)
        self._evicted(name)

    def _evicted(self, name: str) -> None:
        self.loading.pop(name, None)  # a copy still in flight is now stale
        if name in self.prefetched:
            self.prefetched.discard(name)
            self.counters["prefetch_wasted"] += 1
            self.counters["prefetch_wasted_bytes"] += self.entries[name].device_bytes

    # --- policy decisions ---------------------------------------------------------------
    def view(self, now: float, queued: tuple[str, ...]) -> PoolView:
        pinned = frozenset(n for n, r in self.pages.resident.items() if r.pins)
        return PoolView(
            now=now,
            registered=tuple(self.entries),
            on_device=frozenset(self.pages.resident),
            on_host=frozenset(self.host.copies),
            on_disk=frozenset(n for n, e in self.entries.items() if e.source is None).union(self.disk.copies),
            pinned=pinned,
            queued=queued,
            adapter_bytes=MappingProxyType({n: e.device_bytes for n, e in self.entries.items()}),
            device_bytes=self.pages.capacity_pages * self.page_bytes,
            device_slots=self.pages.usable_slots,
            host_bytes=self.host.budget,
            disk_bytes=self.disk.budget,
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
        self._prefetch_into(HOST, decision.host)
        self._prefetch_into(DISK, decision.disk)

    def _prefetch_into(self, kind: int, names: list[str]) -> None:
        """Start reads into the host cache (`HOST`) or fetches into the node cache (`DISK`) of
        `names` (remote ones only, for the node cache), in order, while fewer than
        `max_prefetch_inflight` of the kind are in flight,
        each only if its tier can make room by dropping copies of lower priority."""
        tier, jobs, prefetched, prefix = (
            (self.host, self.host_jobs, self.prefetched_host, "host_")
            if kind == HOST
            else (self.disk, self.disk_jobs, self.prefetched_disk, "disk_")
        )
        for name in names:
            if len(jobs) >= self.max_prefetch_inflight:
                break
            entry = self.entries.get(name)
            if entry is None or name in tier or name in self._busy() or (kind == DISK and entry.source is None):
                continue  # unknown, there already, on its way, or a local folder (nothing to fetch)
            nbytes = entry.host_bytes if kind == HOST else self._disk_copy(entry).nbytes
            if tier.room(nbytes, self.priority.get(name, 0.0), self._busy()):
                job = jobs[name] = self._job(kind, name, entry)
                prefetched.add(name)
                self.counters[f"{prefix}prefetch_issued"] += 1
                self.transfer.submit(job)

    def _busy(self) -> set[str]:
        return self.loading.keys() | self.host_jobs.keys() | self.disk_jobs.keys()

    # --- finished transfers -------------------------------------------------------------
    def collect(self, block: bool = False) -> tuple[list[Job], list[tuple[str, BaseException]]]:
        """Take back the finished transfers (at a step boundary): the device jobs to commit, in
        order, and the failed demand loads. With `block`, wait for one if any is in flight."""
        ready, failures = [], []
        while True:
            job = self.transfer.finished(block=block and bool(self._busy()))
            if job is None:
                return ready, failures
            block = False
            current_entry = self.entries.get(job.name) is job.entry
            if job.error is not None:
                self.counters["load_failures"] += 1
                job.entry.error = job.error
            elif current_entry:
                self.counters["bytes_disk_to_host"] += job.bytes_disk
                self.counters["bytes_remote_to_disk"] += job.bytes_remote
                if job.entry.source is not None and job.source is None:  # read (so fetched) through the node cache
                    self.disk.put(job.name, self._disk_copy(job.entry), self._busy() - {job.name})
                copy = job.read or job.source
                if copy is not None:  # the copy read (or used) stays if the budget allows
                    self.host.put(job.name, copy, self._busy() - {job.name})
            if job.kind in (HOST, DISK):
                if job.kind == HOST and job.error is None and not job.fetch:
                    self.links["disk_to_host"].add(job.bytes_disk, job.busy_s)
                jobs = self.host_jobs if job.kind == HOST else self.disk_jobs
                if jobs.get(job.name) is job:
                    del jobs[job.name]
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
            tier = "host" if job.source is not None else "store" if job.fetch else "disk"
            if tier == "host":
                self.links["host_to_device"].add(job.bytes_device, job.busy_s)
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
        while self._busy():
            ready += self.collect(block=True)[0]
        return ready

    def clear(self) -> None:
        """Empty the device pool and the host cache, adapters staying registered (benchmarks
        replay one policy after another from the same cold state). Nothing may be in use or in
        flight (`drain` first)."""
        pinned = [n for n, r in self.pages.resident.items() if r.pins and n not in self.loading]
        if pinned:
            raise RuntimeError(f"adapters in use: {pinned}")
        if self._busy():
            raise RuntimeError("transfers in flight: drain() first")
        for name in list(self.pages.resident):
            self._evict(name)
        self.host.clear()
        for prefetched in (self.prefetched, self.prefetched_host, self.prefetched_disk):
            prefetched.clear()
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
        self.disk.check()
        assert set(self.host.copies) <= set(self.entries) and set(self.disk.copies) <= set(self.entries)
        assert set(self.loading) <= set(self.pages.resident) and not self.removing & set(self.entries)
        assert all(self.pages.get(n).pins >= 1 for n in self.loading)
        assert all(r.pins >= 0 for r in self.pages.resident.values())

    def stats(self) -> dict:
        self._tick()
        self._settle_prefetches()
        self.counters["host_evictions"] = self.host.evictions
        stats = {
            "adapters_registered": len(self.entries),
            "adapters_on_device": len(self.pages.resident) - len(self.removing),
            "adapters_retiring": len(self.removing),  # removed, their pages still read by running requests
            "adapters_on_host": len(self.host),
            "adapters_in_node_cache": len(self.disk),  # remote ones, as this engine last saw the node cache
            "adapter_pages_used": self.pages.pages_used,
            "adapter_pages_total": self.pages.num_pages - 1,
            "adapter_page_bytes": self.page_bytes,
            "adapter_live_bytes": self.pages.live_bytes,
            "adapter_reserved_bytes": self.pages.pages_used * self.page_bytes,
            "adapter_pool_bytes": self.pages.num_pages * self.page_bytes,
            "adapter_kv_blocks": self.pages.kv_blocks_held,  # KV blocks adapters hold (a unified budget)
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
            **{k: v for link, fit in self.links.items() for k, v in fit.stats(link).items()},
        }
        return stats | adapter_ratios(stats)
