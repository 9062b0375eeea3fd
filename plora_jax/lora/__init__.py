"""Multi-LoRA: PEFT adapters in a paged device pool, across three tiers.

- `peft`: read and validate PEFT folders (`AdapterError` names the file and field), fold the
  scaling into B, lay adapters out in pages.
- `device_pool`: the device pool (`LoraPool`, a pytree), `LoraBatch` (what a step needs) and the
  donated commit.
- `page_allocator`: `PagePool`, the host bookkeeping of the device pool (pages, slots, pins,
  eviction order; `paged` and `contiguous` layouts).
- `registry`: registered adapters and reading them; `host_cache`: the host tier under a budget.
- `transfer`: jobs between tiers; the live transfer thread and the simulated one.
- `residency`: the core both the engine and the simulator run (acquire, release, apply a
  policy decision, poll finished transfers, counters), on a clock and a transfer it is given.
- `manager`: `LoraManager`, the live residency with the device side of a load.

One thread owns all of it (the engine loop, or the simulator); transfers report through their
jobs and never write shared state.
"""

from .device_pool import LoraBatch, LoraPool, commit_adapter, commit_bucket, page_bytes
from .host_cache import HostCache, HostCopy
from .manager import LoraManager
from .page_allocator import KvShare, PagePool, Resident
from .peft import TARGET_MODULES, AdapterError, inspect_adapter, load_adapter, save_random_adapter
from .registry import AdapterEntry, Registry
from .residency import Residency
from .transfer import Job, SimulatedTransfer, ThreadTransfer, VirtualClock

__all__ = [
    "TARGET_MODULES",
    "AdapterEntry",
    "AdapterError",
    "HostCache",
    "HostCopy",
    "Job",
    "KvShare",
    "LoraBatch",
    "LoraManager",
    "LoraPool",
    "PagePool",
    "Registry",
    "Residency",
    "Resident",
    "SimulatedTransfer",
    "ThreadTransfer",
    "VirtualClock",
    "commit_adapter",
    "commit_bucket",
    "inspect_adapter",
    "load_adapter",
    "page_bytes",
    "save_random_adapter",
]
