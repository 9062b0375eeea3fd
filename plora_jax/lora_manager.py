"""Adapters of one engine across three tiers: disk (the registry of PEFT folders), the host
cache (page-laid-out numpy copies under a byte budget) and the device pool. Host state only;
owned by the engine loop thread (the engine routes every call here), which also owns the device
`LoraPool` it hands in.

Registry. `add` validates an adapter from its config and safetensors header (cheap, so a folder
of thousands registers in seconds with `scan`) and, unless told otherwise, reads it into the host
cache at once, which also finds NaN/Inf weights before any request needs them. `describe` reports
each adapter's tier: `disk`, `host`, `loading` or `device`.

Loads are asynchronous. A demand load (`acquire` by an admitted request) or a prefetch (`apply`
of a policy decision) reserves pages at once, so placement is the loop's decision, and hands a
job to the transfer thread, which reads the adapter from disk if the host copy is missing, pads
it to the commit bucket and copies it to the device (`device_put` into fresh staging arrays).
Demand loads go before prefetches, which go before host-only reads. The loop calls `poll` at
every step boundary and commits finished jobs with the donated `commit_adapter` (a scatter of
arrays already on the device), so it never waits on disk or host-to-device copies. Each
placement has a generation number: a job whose placement was evicted (its pages possibly
reassigned) before it finished is dropped, never committed.

Eviction follows the policy: `apply` installs its priorities, the page pool evicts the lowest
first (least recently used among equals), and a prefetch may only displace adapters of lower
priority than its own. The host cache evicts the same way, never a copy a job is using. An
adapter removed while requests run keeps its pages until the last of them finishes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import jax
import numpy as np

from .adapters import AdapterError, inspect_adapter, layout_pages, load_adapter, parse_target_modules
from .buckets import cdiv
from .config import EngineConfig, ModelConfig
from .lora_pool import LoraPool, PagePool, commit_adapter, commit_bucket, page_bytes
from .metrics import ADAPTER_COUNTERS, adapter_mem_util, adapter_ratios
from .policies import Decision, PoolView

DEMAND, PREFETCH, HOST = 0, 1, 2  # job kinds, in the order the transfer thread serves them


@dataclass
class AdapterEntry:
    name: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    num_pages: int
    live_bytes: int  # bytes of the weights at their true ranks
    a_pages: dict | None = None  # host copy: projection -> [num_layers, num_pages, page_rows, in]
    b_pages: dict | None = None
    load_s: float = 0.0  # time of the last device load, from its request to its commit
    error: BaseException | None = None  # why the last load failed

    @property
    def host_bytes(self) -> int:
        if self.a_pages is None:
            return 0
        return sum(a.nbytes for a in self.a_pages.values()) + sum(b.nbytes for b in self.b_pages.values())


@dataclass(eq=False)
class _Job:
    """One transfer in flight: placed by the loop (device jobs), run by the transfer thread."""

    kind: int
    name: str
    entry: AdapterEntry
    slot: int = 0
    pages: list[int] = field(default_factory=list)
    generation: int = 0
    started: float = field(default_factory=time.perf_counter)
    staged: tuple | None = None  # commit_adapter's arguments after the pool, on the device
    error: BaseException | None = None
    bytes_disk: int = 0


log = logging.getLogger(__name__)


class LoraManager:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, dtype):
        self.model_config = model_config
        self.dtype = np.dtype(dtype)
        self.page_rows = config.page_rows
        self.max_rank = config.max_lora_rank
        self.max_pages = cdiv(config.max_lora_rank, config.page_rows)
        self.modules = parse_target_modules(config.lora_target_modules)
        self.page_bytes = page_bytes(model_config, config.page_rows, self.dtype.itemsize, self.modules)
        num_pages = config.lora_pool_pages or max(2, int(config.lora_pool_mb * 2**20) // self.page_bytes)
        self.pages = PagePool(num_pages, config.max_loras + 1, self.max_pages, config.layout)
        self.pages.priority = lambda name: self.priority.get(name, 0.0)
        self.host_budget = int(config.host_cache_mb * 2**20)
        self.max_prefetch_inflight = config.max_prefetch_inflight
        device = jax.devices()[0]
        self.stage_via_pinned = device.platform == "gpu" and "pinned_host" in {
            m.kind for m in device.addressable_memories()
        }
        self.entries: dict[str, AdapterEntry] = {}
        self.priority: dict[str, float] = {}  # eviction priority from the policy's last decision
        self.free_when_unused = False  # reactive: free an adapter when its last request finishes
        self.load_seconds_total = 0.0
        self.counters = dict.fromkeys(ADAPTER_COUNTERS, 0)  # defined in plora_jax.metrics
        self._device_bytes: dict[str, int] = {}  # adapter -> device bytes it occupies (PoolView)
        self._host: OrderedDict[str, int] = OrderedDict()  # host copies (bytes), least recently used first
        self._host_used = 0
        self._loading: dict[str, _Job] = {}  # device loads in flight
        self._host_jobs: dict[str, _Job] = {}  # host-only reads in flight
        self._prefetched: set[str] = set()  # placements made by a prefetch and not used yet
        self._removing: set[str] = set()  # removed while requests still use them
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._read_lock = threading.Lock()  # the transfer thread and `add` both read adapters
        # How a staged adapter reaches the pool: an engine routes both through its compile plan
        # (the commit executable, at a size that is built); standalone, the jitted function.
        self.commit: Callable[..., LoraPool] = commit_adapter
        self.commit_size: Callable[[int], int] = lambda n: commit_bucket(n, self.max_pages)

    @property
    def num_pages(self) -> int:
        return self.pages.num_pages

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def zeros(self) -> LoraPool:
        return LoraPool.zeros(
            self.model_config,
            self.num_pages,
            self.page_rows,
            self.pages.max_slots,
            self.max_pages,
            self.dtype,
            self.modules,
        )

    # --- registry -----------------------------------------------------------------------
    def add(self, name: str, path: str | Path, read: bool = True) -> AdapterEntry:
        """Register `path` under `name`, validated now from its config and tensor header; with
        `read`, also read it into the host cache (which checks the weights for NaN/Inf)."""
        if not isinstance(name, str) or not name or name.strip() != name:
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without surrounding spaces")
        if name in self.entries:
            raise AdapterError(f"adapter name {name!r} is already registered")
        if name in self._removing:
            raise AdapterError(f"adapter name {name!r} was removed and is still used by running requests")
        path = Path(path)
        info = inspect_adapter(path, self.model_config, self.max_rank, self.modules)
        num_pages = cdiv(info.rank, self.page_rows)
        capacity = self.max_pages if self.pages.layout == "contiguous" else self.num_pages - 1
        if num_pages > capacity:
            raise AdapterError(f"{path}: adapter needs {num_pages} pages, the pool holds {capacity}")
        entry = AdapterEntry(
            name, path, info.rank, info.target_modules, num_pages, info.live_elements * self.dtype.itemsize
        )
        if read:
            self._read(entry)
        self.entries[name] = entry
        occupied = self.max_pages if self.pages.layout == "contiguous" else num_pages
        self._device_bytes[name] = occupied * self.page_bytes
        if read:
            self._host_track(entry)
        return entry

    def scan(self, folder: str | Path) -> tuple[list[str], dict[str, str]]:
        """Register every subfolder of `folder` holding adapter_config.json, named after it,
        without reading weights. Returns (names added, {name: error} for folders refused);
        folders already registered under their name and path are skipped."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"{folder}: adapter folder not found")
        added, errors = [], {}
        for sub in sorted(folder.iterdir()):
            if not (sub / "adapter_config.json").is_file():
                continue
            existing = self.entries.get(sub.name)
            if existing is not None and existing.path == sub:
                continue
            try:
                self.add(sub.name, sub, read=False)
                added.append(sub.name)
            except AdapterError as e:
                errors[sub.name] = str(e)
        return added, errors

    def _read(self, entry: AdapterEntry) -> None:
        """Read and lay out the weights into `entry` (any thread)."""
        with self._read_lock:
            adapter = load_adapter(entry.name, entry.path, self.model_config, self.max_rank, self.modules)
            if adapter.rank != entry.rank:
                raise AdapterError(f"{entry.path}: changed since registration (rank {entry.rank} -> {adapter.rank})")
            a_pages, b_pages, _ = layout_pages(adapter, self.model_config, self.page_rows, self.dtype, self.modules)
            entry.a_pages, entry.b_pages = a_pages, b_pages

    def remove(self, name: str) -> None:
        """Unregister `name`. Its device pages are freed now, or when the last running request
        using it finishes; a load in flight becomes stale and is dropped."""
        if name not in self.entries:
            raise ValueError(f"adapter {name!r} is not registered")
        if self._loading.pop(name, None) is not None:
            self.pages.unpin(name)  # the load's own pin
        res = self.pages.get(name)
        if res is not None:
            if res.pins:
                self._removing.add(name)
            else:
                self._evict(name)
        self._host_drop(name)
        self._host_jobs.pop(name, None)
        self._prefetched.discard(name)
        self._device_bytes.pop(name, None)
        self.priority.pop(name, None)
        del self.entries[name]

    def residency(self, name: str) -> str:
        if name in self._loading:
            return "loading"
        if self.pages.get(name) is not None:
            return "device"
        return "host" if self.entries[name].a_pages is not None else "disk"

    def describe(self) -> list[dict]:
        return [
            {
                "name": name,
                "path": str(entry.path),
                "rank": entry.rank,
                "target_modules": list(entry.target_modules),
                "residency": self.residency(name),
                "num_pages": entry.num_pages,
                "bytes": entry.live_bytes,
            }
            for name, entry in self.entries.items()
        ]

    # --- residency (loop thread) --------------------------------------------------------
    def is_loading(self, name: str) -> bool:
        return name in self._loading

    def acquire(self, name: str, first: bool = True) -> int | None:
        """`name`'s adapter_slot, pinned, if it is on the device; else None, with its load started
        or in flight (or waiting for room until pinned adapters are released). `first`: the
        request's first attempt, which is what the hit and cold-start counters count."""
        res = self.pages.get(name)
        if first:
            on_device = res is not None and name not in self._loading
            self.counters["device_hits" if on_device else "cold_starts"] += 1
            if not on_device and self.entries[name].a_pages is not None:
                self.counters["host_hits"] += 1
            if name in self._prefetched:
                self._prefetched.discard(name)
                self.counters["prefetch_used"] += 1
                self.counters["prefetch_hits"] += on_device  # the prefetch finished in time
        if res is not None and name not in self._loading:
            self.pages.pin(name)
            return res.slot
        if name not in self._loading:
            self.start_load(name)
        return None

    def start_load(self, name: str, prefetch: bool = False, evict_below: float | None = None) -> bool:
        """Place `name` in the pool and queue its transfer; False if it does not fit (nothing
        evictable, or with `evict_below` nothing of lower priority)."""
        entry = self.entries[name]
        placed = self.pages.allocate(name, entry.num_pages, entry.live_bytes, evict_below)
        if placed is None:
            return False
        res, evicted = placed
        for other in evicted:
            self._evicted(other)
        job = _Job(PREFETCH if prefetch else DEMAND, name, entry, res.slot, list(res.pages), res.generation)
        if prefetch:
            self._prefetched.add(name)
            self.counters["prefetch_issued"] += 1
        self._loading[name] = job
        self.pages.pin(name)  # a loading adapter is never evicted to make room (that would thrash)
        self._submit(job)
        return True

    def _submit(self, job: _Job) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._transfer_loop, name="plora-adapter-transfer", daemon=True)
            self._worker.start()
        self._jobs.put((job.kind, next(self._seq), job))

    def release(self, name: str, wanted: bool = False) -> None:
        """Unpin `name`; `wanted`: a waiting request needs it (reactive freeing skips it)."""
        self.pages.unpin(name)
        res = self.pages.get(name)
        if res is None or res.pins or name in self._loading:
            return
        if name in self._removing:
            self._removing.discard(name)
            self._evict(name)
        elif self.free_when_unused and not wanted:
            self._evict(name)

    def _evict(self, name: str) -> None:
        self.pages.evict(name)
        self._evicted(name)

    def _evicted(self, name: str) -> None:
        self._loading.pop(name, None)  # a copy still in flight is now stale
        if name in self._prefetched:
            self._prefetched.discard(name)
            self.counters["prefetch_wasted"] += 1

    # --- policy decisions (loop thread) -------------------------------------------------
    def view(self, now: float, queued: tuple[str, ...]) -> PoolView:
        pinned = frozenset(n for n, r in self.pages.resident.items() if r.pins)
        return PoolView(
            now=now,
            registered=tuple(self.entries),
            on_device=frozenset(self.pages.resident),
            on_host=frozenset(self._host),
            pinned=pinned,
            queued=queued,
            adapter_bytes=MappingProxyType(self._device_bytes),
            device_bytes=(self.num_pages - 1) * self.page_bytes,
            device_slots=self.pages.usable_slots,
            host_bytes=self.host_budget,
        )

    def apply(self, decision: Decision) -> None:
        """Install the decision's priorities, drop what it evicts, start what it prefetches."""
        self.priority = {n: float(p) for n, p in decision.priority.items() if n in self.entries}
        for name in decision.evict:
            res = self.pages.get(name)
            if res is not None and not res.pins and name not in self._loading:
                self._evict(name)
        inflight = sum(job.kind == PREFETCH for job in self._loading.values())
        for name in decision.device:
            if inflight >= self.max_prefetch_inflight:
                break
            if name not in self.entries or self.pages.get(name) is not None:
                continue
            if self.start_load(name, prefetch=True, evict_below=self.priority.get(name, 0.0)):
                inflight += 1
        for name in decision.host:
            if len(self._host_jobs) >= self.max_prefetch_inflight:
                break
            entry = self.entries.get(name)
            if entry is None or entry.a_pages is not None or name in self._loading or name in self._host_jobs:
                continue
            size = self._device_bytes[name] if self.pages.layout == "paged" else entry.num_pages * self.page_bytes
            if self._host_room(size, self.priority.get(name, 0.0)):
                job = _Job(HOST, name, entry)
                self._host_jobs[name] = job
                self.counters["host_prefetch_issued"] += 1
                self._submit(job)

    # --- host cache (loop thread) -------------------------------------------------------
    def _host_track(self, entry: AdapterEntry) -> None:
        """Account a host copy the loop now knows of, then keep the cache within budget."""
        size = entry.host_bytes
        if entry.name in self._host:
            self._host_used -= self._host[entry.name]
        self._host[entry.name] = size
        self._host.move_to_end(entry.name)
        self._host_used += size
        self._host_trim(self.host_budget)

    def drop_host_copy(self, name: str) -> None:
        """Forget `name`'s host copy (its next load reads the disk); benchmarks and tests."""
        self._host_drop(name)

    def _host_drop(self, name: str) -> None:
        size = self._host.pop(name, None)
        if size is not None:
            self._host_used -= size
        entry = self.entries.get(name)
        if entry is not None and name not in self._loading and name not in self._host_jobs:
            entry.a_pages = entry.b_pages = None

    def _host_victims(self, below: float | None = None) -> list[str]:
        busy = self._loading.keys() | self._host_jobs.keys()  # a job may be reading those arrays
        names = [n for n in self._host if n not in busy]
        names.sort(key=lambda n: self.priority.get(n, 0.0))  # stable: least recently used first
        if below is not None:
            names = [n for n in names if self.priority.get(n, 0.0) < below]
        return names

    def _host_trim(self, budget: int) -> None:
        for name in self._host_victims():
            if self._host_used <= budget:
                return
            self._host_drop(name)
            self.counters["host_evictions"] += 1

    def _host_room(self, size: int, priority: float) -> bool:
        """Make room for `size` bytes by dropping copies of lower priority; False if it cannot."""
        victims = self._host_victims(below=priority)
        freeable = sum(self._host[n] for n in victims)
        if self._host_used + size - freeable > self.host_budget:
            return False
        self._host_trim(self.host_budget - size)
        return self._host_used + size <= self.host_budget

    def clear(self, pool: LoraPool) -> LoraPool:
        """Empty the device pool and the host cache, adapters staying registered (benchmarks
        replay one policy after another from the same cold state). Nothing may be in use."""
        pinned = [n for n, r in self.pages.resident.items() if r.pins and n not in self._loading]
        if pinned:
            raise RuntimeError(f"adapters in use: {pinned}")
        while self._loading or self._host_jobs:
            pool, _ = self.poll(pool, block=True)
        for name in list(self.pages.resident):
            self._evict(name)
        for name in list(self._host):
            self._host_drop(name)
        self._prefetched.clear()
        self.priority = {}
        return pool

    # --- finished transfers (loop thread) -----------------------------------------------
    def poll(self, pool: LoraPool, block: bool = False) -> tuple[LoraPool, list[tuple[str, BaseException]]]:
        """Commit the finished transfers (at a step boundary); returns the pool and the failed
        demand loads. With `block`, wait for at least one job if any job is in flight."""
        failures = []
        while True:
            try:
                job = self._done.get(block=block and bool(self._loading or self._host_jobs))
            except queue.Empty:
                return pool, failures
            block = False
            current_entry = self.entries.get(job.name) is job.entry
            if job.kind == HOST:
                if self._host_jobs.get(job.name) is job:
                    del self._host_jobs[job.name]
                if job.error is not None:
                    self.counters["load_failures"] += 1
                    job.entry.error = job.error
                elif current_entry:
                    self.counters["bytes_disk_to_host"] += job.bytes_disk
                    self._host_track(job.entry)
                continue
            res = self.pages.get(job.name)
            current = current_entry and res is not None and res.generation == job.generation
            if current:
                self._loading.pop(job.name, None)
                self.pages.unpin(job.name)
            if job.error is not None:
                self.counters["load_failures"] += 1
                job.entry.error = job.error
                if current:
                    self._evict(job.name)
                    failures.append((job.name, job.error))
                continue
            self.counters["bytes_disk_to_host"] += job.bytes_disk
            if current_entry and job.entry.a_pages is not None:
                self._host_track(job.entry)  # the copy read for this load stays if the budget allows
            if not current:
                self.counters["stale_dropped"] += 1  # placement evicted meanwhile: never commit
                continue
            self.counters["bytes_host_to_device"] += sum(a.nbytes for a in jax.tree_util.tree_leaves(job.staged))
            pool = self.commit(pool, *job.staged)
            job.entry.load_s = time.perf_counter() - job.started
            job.entry.error = None
            self.load_seconds_total += job.entry.load_s

    def wait_for(self, name: str, pool: LoraPool) -> tuple[LoraPool, list[tuple[str, BaseException]]]:
        """Block until `name`'s load is committed or failed (for calls such as `logits`)."""
        failures = []
        while name in self._loading:
            pool, failed = self.poll(pool, block=True)
            failures += failed
        return pool, failures

    # --- transfer thread ----------------------------------------------------------------
    def _transfer_loop(self) -> None:
        # Below the loop's priority: on a host with few cores, reading and laying out an adapter
        # would otherwise take CPU from the running steps (it only has to finish before it is needed).
        with contextlib.suppress(AttributeError, OSError):  # not on this platform or not permitted
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            try:
                entry = job.entry
                a_pages, b_pages = entry.a_pages, entry.b_pages  # the loop may drop them meanwhile
                if a_pages is None or b_pages is None:
                    self._read(entry)
                    a_pages, b_pages = entry.a_pages, entry.b_pages
                    job.bytes_disk = entry.live_bytes
                if job.kind != HOST:
                    job.staged = self._stage(job.slot, job.pages, a_pages, b_pages)
            except Exception as e:
                log.warning("loading adapter %r failed: %s", job.name, e)
                job.error = e
            self._done.put(job)

    def _commit_args(self, slot: int, pages: list[int], a_pages: dict, b_pages: dict, bucket: int) -> tuple:
        """commit_adapter's arguments after the pool (numpy), padded to `bucket` pages."""
        n = len(pages)
        page_ids = np.full((bucket,), self.num_pages, np.int32)  # padding: out of range, dropped
        page_ids[:n] = pages
        table_row = np.zeros((self.max_pages,), np.int32)
        table_row[:n] = pages

        def pad(arrays):
            out = {}
            for m, arr in arrays.items():
                if arr.shape[1] == bucket and arr.dtype == self.dtype:
                    out[m] = arr  # already the bucket's size: no copy
                    continue
                padded = np.zeros((arr.shape[0], bucket, *arr.shape[2:]), self.dtype)
                padded[:, : arr.shape[1]] = arr  # contiguous slots: zeros up to the maximum rank
                out[m] = padded
            return out

        return np.int32(slot), page_ids, table_row, np.int32(n), pad(a_pages), pad(b_pages)

    def _stage(self, slot: int, pages: list[int], a_pages: dict, b_pages: dict) -> tuple:
        """The commit's arguments, copied to the device (transfer thread). Through pinned host
        memory where the backend offers it (GPU): the copy to the device is then a DMA."""
        args = self._commit_args(slot, pages, a_pages, b_pages, self.commit_size(len(pages)))
        if self.stage_via_pinned:
            device = jax.devices()[0]
            args = jax.device_put(args, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
            args = jax.device_put(args, jax.sharding.SingleDeviceSharding(device, memory_kind="device"))
        return jax.block_until_ready(jax.device_put(args))

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put((-1, -1, None))
            self._worker.join(timeout=30)

    # --- accounting ---------------------------------------------------------------------
    def memory_util(self) -> float:
        """Adapter memory utilisation (`plora_jax.metrics`): live adapter bytes at true rank over
        the device bytes reserved for the resident adapters."""
        return adapter_mem_util(self.pages.live_bytes, self.pages.pages_used * self.page_bytes)

    def check(self) -> None:
        """Invariants (tests): the page pool's, and the host cache's accounting."""
        self.pages.check()
        assert self._host_used == sum(self._host.values()) and set(self._host) <= set(self.entries)
        assert set(self._loading) <= set(self.pages.resident) and not self._removing & set(self.entries)

    def stats(self) -> dict:
        stats = {
            "adapters_registered": len(self.entries),
            "adapters_on_device": len(self.pages.resident),
            "adapters_on_host": len(self._host),
            "adapter_pages_used": self.pages.pages_used,
            "adapter_pages_total": self.num_pages - 1,
            "adapter_page_bytes": self.page_bytes,
            "adapter_live_bytes": self.pages.live_bytes,
            "adapter_reserved_bytes": self.pages.pages_used * self.page_bytes,
            "adapter_pool_bytes": self.pool_bytes,
            "host_cache_bytes": self._host_used,
            "host_cache_budget": self.host_budget,
            "adapter_loads": self.pages.loads,
            "adapter_evictions": self.pages.evictions,
            "adapter_load_s_total": self.load_seconds_total,
            "adapters_loading": len(self._loading),
            "adapters_pinned": sum(1 for r in self.pages.resident.values() if r.pins),
            **self.counters,
            "lora_layout": self.pages.layout,
        }
        return stats | adapter_ratios(stats)
