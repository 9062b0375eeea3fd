"""Adapters of one engine: the registry (name -> PEFT folder), the host copies laid out in pages,
and residency in the device pool. Host state only; owned by the engine loop thread (the
engine routes `add`/`remove` there), which also owns the device `LoraPool` it hands in.

Residency tiers, as `adapters()` reports them: `disk` (registered, not read), `host` (read,
validated and laid out in pages in host memory), `device` (pages committed to the pool). This
issue loads on demand (S-LoRA's reactive behaviour): `acquire` puts an adapter on the device
when a request needing it is admitted, evicting least-recently-used unpinned adapters, and pins
it until `release`. The prefetch issue adds tiers' budgets and loading ahead of demand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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
    load_s: float = 0.0  # time of the last host -> device commit


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
        # Time-weighted memory utilisation since the last reset (for benchmarks).
        self._util_area = 0.0
        self._util_since = self._util_last = time.perf_counter()

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
            self._account()
            self.pages.evict(name)  # raises if requests still use it
        del self.entries[name]

    def residency(self, name: str) -> str:
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
    def acquire(self, name: str, pool: LoraPool) -> tuple[int | None, LoraPool]:
        """(adapter_slot, pool) with `name` on the device and pinned; slot None if it must wait."""
        res = self.pages.get(name)
        if res is None:
            entry = self.entries[name]
            if entry.a_pages is None:
                self._read(entry)
            self._account()
            placed = self.pages.allocate(name, entry.num_pages, entry.live_bytes)
            if placed is None:
                return None, pool
            res, _ = placed
            start = time.perf_counter()
            pool = self._commit(pool, res.slot, res.pages, entry.a_pages, entry.b_pages)
            entry.load_s = time.perf_counter() - start
            self.load_seconds_total += entry.load_s
        self.pages.pin(name)
        return res.slot, pool

    def release(self, name: str) -> None:
        self.pages.unpin(name)

    def _commit(self, pool: LoraPool, slot: int, pages: list[int], a_pages: dict, b_pages: dict) -> LoraPool:
        n = len(pages)
        bucket = commit_bucket(n, self.max_pages)
        page_ids = np.full((bucket,), self.num_pages, np.int32)  # padding: out of range, dropped
        page_ids[:n] = pages
        table_row = np.zeros((self.max_pages,), np.int32)
        table_row[:n] = pages

        def pad(arrays):
            out = {}
            for m, arr in arrays.items():
                padded = np.zeros((arr.shape[0], bucket, *arr.shape[2:]), arr.dtype)
                padded[:, : arr.shape[1]] = arr  # contiguous slots: zeros up to the maximum rank
                out[m] = padded
            return out

        pool = commit_adapter(pool, np.int32(slot), page_ids, table_row, np.int32(n), pad(a_pages), pad(b_pages))
        pool.num_pages.block_until_ready()  # the load completes here: its time is the cold start
        return pool

    def warmup(self, pool: LoraPool) -> LoraPool:
        """Compile the commit for every page-count bucket (writes nothing: all ids dropped, slot 0 kept empty)."""
        dims = {m: (a.shape, b.shape) for m, a, b in zip(pool.a, pool.a.values(), pool.b.values(), strict=True)}
        for bucket in commit_buckets(self.max_pages):
            page_ids = np.full((bucket,), self.num_pages, np.int32)
            a = {m: np.zeros((s[0], bucket, *s[2:]), self.dtype) for m, (s, _) in dims.items()}
            b = {m: np.zeros((s[0], bucket, *s[2:]), self.dtype) for m, (_, s) in dims.items()}
            pool = commit_adapter(pool, np.int32(0), page_ids, np.zeros((self.max_pages,), np.int32), np.int32(0), a, b)
        return pool

    # --- accounting ---------------------------------------------------------------------
    def memory_util(self) -> float:
        """Bytes of live adapter weights (true ranks) / bytes of the device pool."""
        return self.pages.live_bytes / self.pool_bytes

    def _account(self) -> None:
        now = time.perf_counter()
        self._util_area += self.memory_util() * (now - self._util_last)
        self._util_last = now

    def reset_util_average(self) -> None:
        self._util_area, self._util_since = 0.0, time.perf_counter()
        self._util_last = self._util_since

    def util_average(self) -> float:
        self._account()
        span = self._util_last - self._util_since
        return self._util_area / span if span > 0 else self.memory_util()

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
            "lora_layout": self.pages.layout,
        }
