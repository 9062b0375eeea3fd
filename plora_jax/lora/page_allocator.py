"""Host bookkeeping of the device adapter pool: which pages and which slot each resident adapter
holds, pins, recency and eviction. Plain Python, no jax: the live engine and the simulator run
the same allocator.

Free pages, free slots, the resident adapters in least-recently-used order, and pins (requests
in flight using an adapter, and loads in flight). `allocate` evicts unpinned adapters, lowest
priority first (the policy's), least recently used among equals, only when that makes the new
one fit; if nothing can be evicted yet it returns None and the request waits. Every placement
has a generation number, so a copy staged for an older placement of the same adapter is known
to be stale.

Two layouts behind the same interface:
- `paged`: a rank-r adapter takes ceil(r / page_rows) pages, any free pages, so adapters of
  mixed ranks leave no holes and the pool never fragments.
- `contiguous`: the fixed-slot baseline (vLLM's design): slot s owns the `max_pages` pages
  starting at 1 + (s - 1) * max_pages, i.e. every adapter reserves the maximum rank. It uses
  the same page table and kernels; only the allocation differs, which is the point of the
  memory comparison.

One budget for KV and adapters (`KvShare`, `EngineConfig.adapter_memory="unified"`): S-LoRA
keeps adapter weights and the KV cache in one memory pool, so an adapter kept resident is KV
the engine does not have. With a share, each placement also takes the KV blocks its pages are
worth from the scheduler's allocator and gives them back when it is evicted; `reclaim` evicts
unpinned adapters when the KV cache needs their blocks. The page count still bounds the pool
(the page table's size); set it high and the KV budget is what binds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from ..buckets import cdiv
from ..names import LORA_LAYOUTS, check_name


class BlockSource(Protocol):
    """Where a unified budget's KV blocks come from: the scheduler's `BlockAllocator`."""

    @property
    def num_free(self) -> int: ...

    def allocate(self, n: int) -> list[int]: ...

    def free(self, blocks: list[int]) -> None: ...


@dataclass(frozen=True)
class KvShare:
    """The KV cache's side of one device-memory budget: adapter pages are paid for in KV blocks."""

    blocks: BlockSource  # the allocator the scheduler admits and grows requests from
    page_bytes: int  # device bytes of one adapter page
    block_bytes: int  # device bytes of one KV block (every layer, K and V)

    def blocks_for(self, pages: int) -> int:
        return kv_blocks_for(pages, self.page_bytes, self.block_bytes)


def kv_blocks_for(pages: int, page_bytes: int, block_bytes: int) -> int:
    """KV blocks `pages` adapter pages are worth (rounded up: a block is not shared)."""
    return cdiv(pages * page_bytes, block_bytes)


@dataclass
class Resident:
    slot: int
    pages: list[int]
    live_bytes: int  # bytes of the adapter's weights at their true rank
    pins: int = 0
    generation: int = 0  # which placement this is: a staged copy for an older one is stale
    blocks: list[int] = field(default_factory=list)  # KV blocks its pages are worth (a unified budget)


class PagePool:
    """Host bookkeeping of the device pool. Owned by the engine loop thread."""

    def __init__(
        self, num_pages: int, max_slots: int, max_pages: int, layout: str = "paged", kv: KvShare | None = None
    ):
        check_name("lora layout", layout, LORA_LAYOUTS)
        self.kv = kv  # None: the pool is memory of its own, on top of the KV cache
        if num_pages < 2 or max_slots < 2:
            raise ValueError(
                f"the adapter pool needs >= 2 pages and >= 2 slots (page 0 and slot 0 are reserved), "
                f"got {num_pages} pages, {max_slots} slots"
            )
        self.num_pages, self.max_slots, self.max_pages, self.layout = num_pages, max_slots, max_pages, layout
        if layout == "paged":
            self._free_pages = list(range(num_pages - 1, 0, -1))
            usable_slots = max_slots - 1
        else:
            usable_slots = min(max_slots - 1, (num_pages - 1) // max_pages)
            if usable_slots < 1:
                raise ValueError(f"a contiguous pool of {num_pages} pages cannot hold one adapter of {max_pages} pages")
            self._free_pages = []
        self.usable_slots = usable_slots
        self._free_slots = list(range(usable_slots, 0, -1))
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self.priority: Callable[[str], float] = lambda name: 0.0  # eviction priority (the policy's)
        self.loads = 0
        self.evictions = 0
        self._generation = 0

    # --- queries ------------------------------------------------------------------------
    def get(self, name: str) -> Resident | None:
        return self.resident.get(name)

    @property
    def pages_used(self) -> int:
        """Pages adapters hold (in the contiguous layout, each slot's whole region)."""
        return sum(len(r.pages) for r in self.resident.values())

    @property
    def live_bytes(self) -> int:
        return sum(r.live_bytes for r in self.resident.values())

    @property
    def kv_blocks_held(self) -> int:
        """KV blocks the resident adapters hold (0 without a unified budget)."""
        return sum(len(r.blocks) for r in self.resident.values())

    @property
    def capacity_pages(self) -> int:
        """Pages adapters could hold now: the pool's, or with a unified budget no more than the
        KV blocks free or held by adapters are worth."""
        pages = self.num_pages - 1
        if self.kv is None:
            return pages
        spare = (self.kv.blocks.num_free + self.kv_blocks_held) * self.kv.block_bytes
        return min(pages, spare // self.kv.page_bytes)

    # --- pins and recency ---------------------------------------------------------------
    def pin(self, name: str) -> Resident:
        res = self.resident[name]
        res.pins += 1
        self.resident.move_to_end(name)
        return res

    def unpin(self, name: str) -> None:
        res = self.resident.get(name)
        if res is not None and res.pins > 0:
            res.pins -= 1

    def rename(self, old: str, new: str) -> None:
        """Keep `old`'s placement (pins, pages, recency) under the name `new`."""
        if new in self.resident:
            raise ValueError(f"adapter {new!r} is already resident")
        self.resident = OrderedDict((new if name == old else name, res) for name, res in self.resident.items())

    # --- allocation ---------------------------------------------------------------------
    def _charge(self, num_pages: int) -> int:
        """KV blocks a placement of `num_pages` takes (its whole region when contiguous)."""
        if self.kv is None:
            return 0
        return self.kv.blocks_for(num_pages if self.layout == "paged" else self.max_pages)

    @property
    def max_charge(self) -> int:
        """KV blocks the largest adapter takes (0 without a unified budget)."""
        return self._charge(self.max_pages)

    def _room(self) -> tuple[int, int, int]:
        """Free (slots, pages, KV blocks) now."""
        return len(self._free_slots), len(self._free_pages), self.kv.blocks.num_free if self.kv else 0

    def _freed_by(self, name: str) -> tuple[int, int, int]:
        res = self.resident[name]
        return 1, len(res.pages) if self.layout == "paged" else 0, len(res.blocks)

    def _fits(self, num_pages: int, room: tuple[int, int, int]) -> bool:
        slots, pages, blocks = room
        paged_fits = self.layout == "contiguous" or pages >= num_pages
        return slots > 0 and paged_fits and blocks >= self._charge(num_pages)

    def allocate(
        self,
        name: str,
        num_pages: int,
        live_bytes: int,
        evict_below: float | None = None,
        keep: Collection[str] = (),
    ) -> tuple[Resident, list[str]] | None:
        """Place `name`, evicting unpinned adapters if needed (lowest priority first, least
        recently used among equals; with `evict_below`, only those of lower priority; never one
        in `keep`). None if it cannot fit until pinned adapters are released. Returns
        (placement, evicted names)."""
        if name in self.resident:
            raise ValueError(f"adapter {name!r} is already resident")
        if num_pages > self.max_pages:
            raise ValueError(f"adapter {name!r} needs {num_pages} pages, more than max_pages={self.max_pages}")
        room = self._room()
        victims = [] if self._fits(num_pages, room) else self._victims(num_pages, evict_below, keep)
        for other in victims:
            room = _plus(room, self._freed_by(other))
        if not self._fits(num_pages, room):
            return None
        for other in victims:
            self.evict(other)
        slot = self._free_slots.pop()
        if self.layout == "paged":
            pages = [self._free_pages.pop() for _ in range(num_pages)]
        else:  # the whole fixed region: the adapter is padded to the maximum rank, in memory and compute
            first = 1 + (slot - 1) * self.max_pages
            pages = list(range(first, first + self.max_pages))
        blocks = self.kv.blocks.allocate(self._charge(num_pages)) if self.kv else []
        self._generation += 1
        res = Resident(slot, pages, live_bytes, generation=self._generation, blocks=blocks)
        self.resident[name] = res
        self.loads += 1
        return res, victims

    def _candidates(self, evict_below: float | None = None, keep: Collection[str] = ()) -> list[str]:
        """Unpinned adapters not in `keep`, lowest priority and least recently used first (with
        `evict_below`, only those of lower priority)."""
        candidates = [name for name, res in self.resident.items() if res.pins == 0 and name not in keep]
        candidates.sort(key=self.priority)  # stable: least recently used first among equals
        if evict_below is not None:
            candidates = [name for name in candidates if self.priority(name) < evict_below]
        return candidates

    def _victims(self, num_pages: int, evict_below: float | None, keep: Collection[str] = ()) -> list[str]:
        """Unpinned adapters to evict so that `num_pages` fit: lowest priority and least recently
        used first, but size-aware within the first half: if one adapter there frees enough on
        its own, the smallest such goes (evicting a rank-128 adapter to make room for a rank-8
        one would leave most of its pages idle). The contiguous layout only needs a slot (and,
        with a unified budget, its blocks)."""
        candidates = self._candidates(evict_below, keep)
        room = self._room()
        if self.layout == "paged":
            window = candidates[: max(1, len(candidates) // 2)]
            single = [n for n in window if self._fits(num_pages, _plus(room, self._freed_by(n)))]
            if single:
                return [min(single, key=lambda n: len(self.resident[n].pages))]
        victims = []
        for name in candidates:
            if self._fits(num_pages, room):
                break
            victims.append(name)
            room = _plus(room, self._freed_by(name))
        return victims

    def reclaim(self, num_blocks: int) -> list[str]:
        """With a unified budget, evict unpinned adapters (lowest priority, least recently used
        first) until `num_blocks` KV blocks are free, and only if that gets there: the KV cache
        needs them. The evicted names."""
        if self.kv is None or self.kv.blocks.num_free >= num_blocks:
            return []
        victims, free = [], self.kv.blocks.num_free
        for name in self._candidates():
            if free >= num_blocks:
                break
            if self.resident[name].blocks:
                victims.append(name)
                free += len(self.resident[name].blocks)
        if free < num_blocks:
            return []
        for name in victims:
            self.evict(name)
        return victims

    def evict(self, name: str) -> None:
        res = self.resident.pop(name)
        if res.pins:
            self.resident[name] = res
            raise ValueError(f"adapter {name!r} is in use by {res.pins} request(s)")
        self._free_slots.append(res.slot)
        if self.layout == "paged":
            self._free_pages.extend(reversed(res.pages))
        if res.blocks:
            self.kv.blocks.free(res.blocks)
        self.evictions += 1

    def check(self) -> None:
        """Invariants (tests): every page and slot is either free or owned by exactly one adapter."""
        owned_pages = [p for r in self.resident.values() for p in r.pages]
        owned_slots = [r.slot for r in self.resident.values()]
        assert len(set(owned_slots)) == len(owned_slots) and not set(owned_slots) & set(self._free_slots)
        assert 0 not in owned_slots and 0 not in owned_pages
        assert len(set(owned_pages)) == len(owned_pages)
        if self.layout == "paged":
            assert not set(owned_pages) & set(self._free_pages)
            assert len(owned_pages) + len(self._free_pages) == self.num_pages - 1
        assert all(len(r.blocks) == self._charge(len(r.pages)) for r in self.resident.values())


def _plus(room: tuple[int, int, int], freed: tuple[int, int, int]) -> tuple[int, int, int]:
    return room[0] + freed[0], room[1] + freed[1], room[2] + freed[2]
