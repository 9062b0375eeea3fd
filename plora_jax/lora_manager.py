"""Adapters of one engine: the registry (name -> PEFT folder), the host copies laid out in pages,
and residency in the device pool. Host state only; owned by the engine loop thread (the
engine routes `add`/`remove` there), which also owns the device `LoraPool` it hands in.

Residency tiers, as `adapters()` reports them: `disk` (registered, not read), `host` (read,
validated and laid out in pages in host memory), `device` (pages committed to the pool). This
issue loads on demand (S-LoRA's reactive behaviour): `acquire` puts an adapter on the device
when a request needing it is admitted, evicting least-recently-used unpinned adapters, and pins
it until `release`. The prefetch issue adds tiers' budgets and loading ahead of demand.

Loads are asynchronous. `acquire` on an adapter that is not on the device reserves its pages at
once (so the decision is the loop's) and hands a job to a transfer thread, which reads the
adapter from disk if the host copy is missing, pads it to the commit bucket and copies it to
the device (`device_put` into fresh staging arrays). The loop calls `poll` at every step
boundary and commits finished jobs with the donated `commit_adapter`, which on the device is a
scatter of already-resident arrays. The loop therefore never waits on disk or host-to-device
copies; requests for a loading adapter wait in the queue while others keep decoding. Each
placement has a generation number: a job whose placement was evicted (its pages possibly
reassigned) before it finished is dropped, never committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from .adapters import AdapterError, LoraAdapter, layout_pages, load_adapter, parse_target_modules
from .buckets import cdiv
from .config import EngineConfig, ModelConfig
from .lora_pool import LoraPool, PagePool, commit_adapter, commit_bucket, commit_buckets, page_bytes


@dataclass
class AdapterEntry:
    name: str
    path: Path
    adapter: LoraAdapter | None = None
    a_pages: dict | None = None  # projection -> [num_layers, num_pages, page_rows, in] (host)
    b_pages: dict | None = None
    num_pages: int = 0
    live_bytes: int = 0
    load_s: float = 0.0  # time of the last load, from its request to its commit
    error: BaseException | None = None  # why the last load failed


@dataclass(eq=False)
class _Load:
    """One adapter load in flight: placed by the loop, staged by the transfer thread."""

    name: str
    entry: AdapterEntry
    slot: int
    pages: list[int]
    generation: int
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
        self.entries: dict[str, AdapterEntry] = {}
        self.load_seconds_total = 0.0
        self.counters = dict.fromkeys(
            ("cold_starts", "device_hits", "host_hits", "stale_dropped", "load_failures"), 0
        ) | {"bytes_disk_to_host": 0, "bytes_host_to_device": 0}
        self._loading: dict[str, _Load] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._read_lock = threading.Lock()  # the transfer thread and `add` both read adapters

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
    def add(self, name: str, path: str | Path) -> AdapterEntry:
        """Register and read `path` (validated now, so a bad adapter fails here, not mid-serving)."""
        if not isinstance(name, str) or not name or name.strip() != name:
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without surrounding spaces")
        if name in self.entries:
            raise AdapterError(f"adapter name {name!r} is already registered")
        entry = AdapterEntry(name, Path(path))
        self._read(entry)
        self.entries[name] = entry
        return entry

    def _read(self, entry: AdapterEntry) -> None:
        with self._read_lock:
            adapter = load_adapter(entry.name, entry.path, self.model_config, self.max_rank, self.modules)
            entry.adapter = adapter
            entry.a_pages, entry.b_pages, entry.num_pages = layout_pages(
                adapter, self.model_config, self.page_rows, self.dtype, self.modules
            )
            entry.live_bytes = adapter.live_elements() * self.dtype.itemsize

    def remove(self, name: str) -> None:
        if name not in self.entries:
            raise ValueError(f"adapter {name!r} is not registered")
        if self.pages.get(name) is not None:
            if self._loading.pop(name, None) is not None:
                self.pages.unpin(name)  # the transfer in flight becomes stale and is dropped
            self.pages.evict(name)  # raises if requests still use it
        del self.entries[name]

    def residency(self, name: str) -> str:
        if name in self._loading:
            return "loading"
        if self.pages.get(name) is not None:
            return "device"
        return "host" if self.entries[name].a_pages is not None else "disk"

    def describe(self) -> list[dict]:
        out = []
        for name, entry in self.entries.items():
            adapter = entry.adapter
            out.append(
                {
                    "name": name,
                    "path": str(entry.path),
                    "rank": adapter.rank if adapter else None,
                    "target_modules": adapter.target_modules if adapter else None,
                    "residency": self.residency(name),
                    "num_pages": entry.num_pages,
                    "bytes": entry.live_bytes,
                }
            )
        return out

    # --- residency (loop thread) --------------------------------------------------------
    def is_loading(self, name: str) -> bool:
        return name in self._loading

    def acquire(self, name: str, pool: LoraPool) -> tuple[int | None, LoraPool]:
        """(adapter_slot, pool) with `name` on the device and pinned; slot None: not yet (its load
        is in flight, or the pool has no room until pinned adapters are released)."""
        res = self.pages.get(name)
        if res is not None and name not in self._loading:
            self.counters["device_hits"] += 1
            self.pages.pin(name)
            return res.slot, pool
        if name in self._loading:
            return None, pool
        self.start_load(name)
        return None, pool

    def start_load(self, name: str) -> bool:
        """Place `name` in the pool and queue its transfer; False if nothing can be evicted yet."""
        entry = self.entries[name]  # read at `add`, so its page count is known
        placed = self.pages.allocate(name, entry.num_pages, entry.live_bytes)
        if placed is None:
            return False
        res, evicted = placed
        for other in evicted:
            self._loading.pop(other, None)  # its staged copy, if any, is now stale
        self.counters["cold_starts"] += 1
        if entry.a_pages is not None:
            self.counters["host_hits"] += 1
        job = _Load(name, entry, res.slot, list(res.pages), res.generation)
        self._loading[name] = job
        self.pages.pin(name)  # a loading adapter is never evicted to make room (that would thrash)
        if self._worker is None:
            self._worker = threading.Thread(target=self._transfer_loop, name="plora-adapter-transfer", daemon=True)
            self._worker.start()
        self._jobs.put(job)
        return True

    def poll(self, pool: LoraPool, block: bool = False) -> tuple[LoraPool, list[tuple[str, BaseException]]]:
        """Commit the finished transfers (at a step boundary); returns the pool and failed loads.

        With `block`, wait for at least one job to finish if any is in flight."""
        failures = []
        while True:
            try:
                job = self._done.get(block=block and bool(self._loading))
            except queue.Empty:
                return pool, failures
            block = False
            res = self.pages.get(job.name)
            current = res is not None and res.generation == job.generation
            if current:
                self._loading.pop(job.name, None)
                self.pages.unpin(job.name)
            if job.error is not None:
                self.counters["load_failures"] += 1
                job.entry.error = job.error
                if current:
                    self.pages.evict(job.name)
                    failures.append((job.name, job.error))
                continue
            if not current:
                self.counters["stale_dropped"] += 1  # placement evicted meanwhile: never commit
                continue
            self.counters["bytes_disk_to_host"] += job.bytes_disk
            self.counters["bytes_host_to_device"] += sum(a.nbytes for a in jax.tree_util.tree_leaves(job.staged))
            pool = commit_adapter(pool, *job.staged)
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

    def release(self, name: str) -> None:
        self.pages.unpin(name)

    # --- transfer thread ----------------------------------------------------------------
    def _transfer_loop(self) -> None:
        # Below the loop's priority: on a host with few cores, reading and laying out an adapter
        # would otherwise take CPU from the running steps (it only has to finish before it is needed).
        with contextlib.suppress(AttributeError, OSError):  # not on this platform or not permitted
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                entry = job.entry
                if entry.a_pages is None:
                    self._read(entry)
                    job.bytes_disk = entry.live_bytes
                job.staged = self._stage(job.slot, job.pages, entry.a_pages, entry.b_pages)
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
                padded = np.zeros((arr.shape[0], bucket, *arr.shape[2:]), self.dtype)
                padded[:, : arr.shape[1]] = arr  # contiguous slots: zeros up to the maximum rank
                out[m] = padded
            return out

        return np.int32(slot), page_ids, table_row, np.int32(n), pad(a_pages), pad(b_pages)

    def _stage(self, slot: int, pages: list[int], a_pages: dict, b_pages: dict) -> tuple:
        """The commit's arguments, copied to the device (transfer thread)."""
        args = self._commit_args(slot, pages, a_pages, b_pages, commit_bucket(len(pages), self.max_pages))
        return jax.block_until_ready(jax.device_put(args))

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=30)

    def warmup(self, pool: LoraPool) -> LoraPool:
        """Compile the commit for every page-count bucket (writes nothing: all ids dropped, slot 0 kept empty)."""
        no_pages = lambda pools: {m: np.zeros((x.shape[0], 0, *x.shape[2:]), self.dtype) for m, x in pools.items()}
        for bucket in commit_buckets(self.max_pages):
            pool = commit_adapter(pool, *self._commit_args(0, [], no_pages(pool.a), no_pages(pool.b), bucket))
        return pool

    # --- accounting ---------------------------------------------------------------------
    def memory_util(self) -> float:
        """Bytes of live adapter weights (true ranks) / bytes of the device pool."""
        return self.pages.live_bytes / self.pool_bytes

    def stats(self) -> dict:
        return {
            "adapters_registered": len(self.entries),
            "adapters_on_device": len(self.pages.resident),
            "adapter_pages_used": self.pages.pages_used,
            "adapter_pages_total": self.num_pages - 1,
            "adapter_mem_util": self.memory_util(),
            "adapter_loads": self.pages.loads,
            "adapter_evictions": self.pages.evictions,
            "adapter_load_s_total": self.load_seconds_total,
            "adapters_loading": len(self._loading),
            **self.counters,
            "lora_layout": self.pages.layout,
        }
