"""The live residency: the core of `residency.py` on the real clock, with the transfer thread,
and the device side of a load (staging and the donated commit).

The transfer thread reads an adapter's folder when there is no host copy and lays its pages
out. The loop then issues the copy to the device (`_issue`: the commit's arguments padded to
the commit bucket, `device_put` without waiting; on GPU through pinned host memory, so the copy
is a DMA), at once for a copy already in the host cache. At every step boundary the engine
loop calls `poll`, which commits the copies that have landed with the donated
`commit_adapter` (a write of arrays already on the device into the pool), so the loop never
waits on disk or host-to-device copies. How a staged adapter reaches the pool is injectable (`commit`,
`commit_size`): an engine routes both through its compile plan, so only built sizes are used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from ..buckets import cdiv
from ..config import EngineConfig, ModelConfig
from ..trusted_cache import cache_root
from .device_pool import LoraPool, commit_adapter, commit_bucket, page_bytes
from .host_cache import HostCache, HostCopy
from .node_cache import NodeCache
from .page_allocator import BlockSource, KvShare, PagePool
from .peft import AdapterError, parse_target_modules
from .registry import AdapterEntry, Registry
from .residency import Residency
from .transfer import Job, ThreadTransfer


class LoraManager(Residency):
    def __init__(self, model_config: ModelConfig, config: EngineConfig, dtype, kv_blocks: BlockSource | None = None):
        """`kv_blocks`: the scheduler's KV block allocator, which the pool's pages are paid from
        under `adapter_memory="unified"` (None: the pool is memory of its own)."""
        self.model_config = model_config
        self.dtype = np.dtype(dtype)
        self.page_rows = config.page_rows
        self.max_pages = cdiv(config.max_lora_rank, config.page_rows)
        self.modules = parse_target_modules(config.lora_target_modules)
        one_page = page_bytes(model_config, config.page_rows, self.dtype.itemsize, self.modules)
        num_pages = config.lora_pool_pages or max(2, int(config.lora_pool_mb * 2**20) // one_page)
        kv = None
        if config.adapter_memory == "unified":
            if kv_blocks is None:
                raise ValueError('adapter_memory="unified" needs the KV block allocator (kv_blocks)')
            kv = KvShare(kv_blocks, one_page, model_config.kv_block_bytes(config.block_size, self.dtype.itemsize))
        pages = PagePool(num_pages, config.max_loras + 1, self.max_pages, config.layout, kv)
        node_root = config.node_cache_dir or cache_root(config.cache_dir) / "adapters"
        self.node_cache = NodeCache(node_root, int(config.node_cache_mb * 2**20), config.source_options())
        registry = Registry(
            model_config, self.dtype, config.max_lora_rank, config.page_rows, self.modules, config.layout,
            num_pages - 1, one_page, self.node_cache,
        )  # fmt: skip
        host = HostCache(int(config.host_cache_mb * 2**20))
        disk = HostCache(self.node_cache.budget)  # this engine's view of the node cache
        # `_read` and `_issue` are looked up at each job, so a test may hold them.
        self._read = registry.read
        transfer = ThreadTransfer(
            lambda *read: self._read(*read), lambda job, copy: self._issue(job, copy), registry.fetch
        )
        super().__init__(registry, pages, host, disk, transfer, time.perf_counter, config.max_prefetch_inflight)
        device = jax.devices()[0]
        self.stage_via_pinned = device.platform == "gpu" and "pinned_host" in {
            m.kind for m in device.addressable_memories()
        }
        self.commit: Callable[..., LoraPool] = commit_adapter
        self.commit_size: Callable[[int], int] = lambda n: commit_bucket(n, self.max_pages)

    @property
    def num_pages(self) -> int:
        return self.pages.num_pages

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def host_budget(self) -> int:
        return self.host.budget

    def zeros(self) -> LoraPool:
        return LoraPool.zeros(
            self.model_config, self.num_pages, self.page_rows, self.pages.max_slots, self.max_pages, self.dtype,
            self.modules,
        )  # fmt: skip

    # --- registry -----------------------------------------------------------------------
    def prepare(self, name: str, path: str | Path, read: bool = True) -> tuple[AdapterEntry, HostCopy | None]:
        """Validate (and with `read`, read and check for NaN/Inf) an adapter folder: any thread."""
        return self.registry.prepare(name, path, read)

    def add(self, name: str, path: str | Path, read: bool = True) -> AdapterEntry:
        """`prepare` and `insert` in one call (on the owner thread)."""
        if name in self.entries:
            raise AdapterError(f"adapter name {name!r} is already registered", "name")
        return self.insert(*self.prepare(name, path, read))

    def scan(self, folder: str | Path) -> tuple[list[str], dict[str, str]]:
        """Register every subfolder of `folder` holding adapter_config.json, named after it,
        without reading weights. Returns (names added, {name: error} for folders refused)."""
        return self.insert_found(*self.registry.scan(folder))

    def insert_found(self, found: list[AdapterEntry], errors: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """Register the entries a scan found (on the owner thread); (names added, errors)."""
        added = []
        for entry in found:
            try:
                self.insert(entry)
                added.append(entry.name)
            except AdapterError as e:
                errors[entry.name] = str(e)
        return added, errors

    # --- device side (loop thread) ------------------------------------------------------
    def poll(self, pool: LoraPool, block: bool = False) -> tuple[LoraPool, list[tuple[str, BaseException]]]:
        """Commit the finished transfers; returns the pool and the failed demand loads."""
        ready, failures = self.collect(block)
        return self._commit_all(pool, ready), failures

    def wait_for(self, name: str, pool: LoraPool) -> tuple[LoraPool, list[tuple[str, BaseException]]]:
        ready, failures = self.collect_for(name)
        return self._commit_all(pool, ready), failures

    def clear(self, pool: LoraPool) -> LoraPool:
        pinned = [n for n, r in self.pages.resident.items() if r.pins and n not in self.loading]
        if pinned:
            raise RuntimeError(f"adapters in use: {pinned}")
        pool = self._commit_all(pool, self.drain())
        super().clear()
        return pool

    def _commit_all(self, pool: LoraPool, jobs: list[Job]) -> LoraPool:
        for job in jobs:
            pool = self.commit(pool, *job.staged)
        return pool

    def _commit_args(self, job: Job, copy: HostCopy, bucket: int) -> tuple:
        """commit_adapter's arguments after the pool (numpy), padded to `bucket` pages."""
        n = len(job.pages)
        page_ids = np.full((bucket,), self.num_pages, np.int32)  # padding: out of range, dropped
        page_ids[:n] = job.pages
        table_row = np.zeros((self.max_pages,), np.int32)
        table_row[:n] = job.pages

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

        return np.int32(job.slot), page_ids, table_row, np.int32(n), pad(copy.a_pages), pad(copy.b_pages)

    def _issue(self, job: Job, copy: HostCopy) -> tuple:
        """The commit's arguments, copied to the device without waiting (the loop; `finished`
        hands the job back once they have landed). Through pinned host memory where the backend
        offers it (GPU): the copy to the device is then a DMA."""
        args = self._commit_args(job, copy, self.commit_size(len(job.pages)))
        if self.stage_via_pinned:
            device = jax.devices()[0]
            args = jax.device_put(args, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
            args = jax.device_put(args, jax.sharding.SingleDeviceSharding(device, memory_kind="device"))
        return jax.device_put(args)

    def close(self) -> None:
        self.transfer.close()
