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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..names import LORA_LAYOUTS, check_name


@dataclass
class Resident:
    slot: int
    pages: list[int]
    live_bytes: int  # bytes of the adapter's weights at their true rank
    pins: int = 0
    generation: int = 0  # which placement this is: a staged copy for an older one is stale


class PagePool:
    """Host bookkeeping of the device pool. Owned by the engine loop thread."""

    def __init__(self, num_pages: int, max_slots: int, max_pages: int, layout: str = "paged"):
        check_name("lora layout", layout, LORA_LAYOUTS)
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
    def _fits(self, num_pages: int, free_slots: int, free_pages: int) -> bool:
        return free_slots > 0 and (self.layout == "contiguous" or free_pages >= num_pages)

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
        free_slots, free_pages = len(self._free_slots), len(self._free_pages)
        fits = self._fits(num_pages, free_slots, free_pages)
        victims = [] if fits else self._victims(num_pages, evict_below, keep)
        free_slots += len(victims)
        free_pages += sum(len(self.resident[v].pages) for v in victims)
        if not self._fits(num_pages, free_slots, free_pages):
            return None
        for other in victims:
            self.evict(other)
        slot = self._free_slots.pop()
        if self.layout == "paged":
            pages = [self._free_pages.pop() for _ in range(num_pages)]
        else:  # the whole fixed region: the adapter is padded to the maximum rank, in memory and compute
            first = 1 + (slot - 1) * self.max_pages
            pages = list(range(first, first + self.max_pages))
        self._generation += 1
        res = Resident(slot, pages, live_bytes, generation=self._generation)
        self.resident[name] = res
        self.loads += 1
        return res, victims

    def _victims(self, num_pages: int, evict_below: float | None, keep: Collection[str] = ()) -> list[str]:
        """Unpinned adapters to evict so that `num_pages` fit: lowest priority and least recently
        used first, but size-aware within the first half: if one adapter there frees enough pages
        on its own, the smallest such goes (evicting a rank-128 adapter to make room for a rank-8
        one would leave most of its pages idle). The contiguous layout only needs a slot."""
        candidates = [name for name, res in self.resident.items() if res.pins == 0 and name not in keep]
        candidates.sort(key=self.priority)  # stable: least recently used first among equals
        if evict_below is not None:
            candidates = [name for name in candidates if self.priority(name) < evict_below]
        if self.layout == "paged":
            deficit = num_pages - len(self._free_pages)
            window = candidates[: max(1, len(candidates) // 2)]
            single = [n for n in window if len(self.resident[n].pages) >= deficit]
            if single:
                return [min(single, key=lambda n: len(self.resident[n].pages))]
        victims, free_slots, free_pages = [], len(self._free_slots), len(self._free_pages)
        for name in candidates:
            if self._fits(num_pages, free_slots, free_pages):
                break
            victims.append(name)
            free_slots += 1
            free_pages += len(self.resident[name].pages)
        return victims

    def evict(self, name: str) -> None:
        res = self.resident.pop(name)
        if res.pins:
            self.resident[name] = res
            raise ValueError(f"adapter {name!r} is in use by {res.pins} request(s)")
        self._free_slots.append(res.slot)
        if self.layout == "paged":
            self._free_pages.extend(reversed(res.pages))
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
