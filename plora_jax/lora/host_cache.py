"""The host tier: page-laid-out copies of adapters in host memory, under a byte budget.

A copy (`HostCopy`) is what a device load stages from: for every projection, A^T and B pages
`[num_layers, num_pages, page_rows, width]`. In a simulation only its size is known (`a_pages`
and `b_pages` are None); the accounting is the same.

Eviction follows the policy: the copies of lowest priority go first, least recently used among
equals. `room` makes space for a new copy only by dropping copies of strictly lower priority,
so a policy's host prefetch never displaces what it ranks higher. A job that is staging from a
copy holds its own reference to it, so dropping a copy here never pulls arrays from under a
transfer in flight; `busy` names the copies the owner still wants kept meanwhile.

Owned by one thread (the engine loop, or the simulator); the transfer thread never touches it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCopy:
    a_pages: dict | None  # projection -> [num_layers, num_pages, page_rows, in]; None when simulated
    b_pages: dict | None  # projection -> [num_layers, num_pages, page_rows, out]
    nbytes: int

    @classmethod
    def of(cls, a_pages: dict, b_pages: dict) -> HostCopy:
        nbytes = sum(a.nbytes for a in a_pages.values()) + sum(b.nbytes for b in b_pages.values())
        return cls(a_pages, b_pages, nbytes)


class HostCache:
    def __init__(self, budget: int, priority: Callable[[str], float] = lambda name: 0.0):
        self.budget = budget
        self.priority = priority  # the policy's eviction priority of an adapter
        self.copies: OrderedDict[str, HostCopy] = OrderedDict()  # least recently used first
        self.used = 0
        self.evictions = 0

    def __contains__(self, name: str) -> bool:
        return name in self.copies

    def __len__(self) -> int:
        return len(self.copies)

    def get(self, name: str) -> HostCopy | None:
        return self.copies.get(name)

    def put(self, name: str, copy: HostCopy, busy: Collection[str] = ()) -> None:
        """Keep `copy` as `name`'s (most recently used), then trim the cache to its budget (the
        new copy included: with a zero budget nothing stays)."""
        self.drop(name)
        self.copies[name] = copy
        self.used += copy.nbytes
        self.trim(self.budget, busy)

    def drop(self, name: str) -> None:
        copy = self.copies.pop(name, None)
        if copy is not None:
            self.used -= copy.nbytes

    def victims(self, busy: Collection[str] = (), below: float | None = None) -> list[str]:
        """Copies that may go, in eviction order (lowest priority first, then least recent)."""
        names = [n for n in self.copies if n not in busy]
        names.sort(key=self.priority)  # stable: least recently used first among equals
        if below is not None:
            names = [n for n in names if self.priority(n) < below]
        return names

    def trim(self, budget: int, busy: Collection[str] = ()) -> None:
        for name in self.victims(busy):
            if self.used <= budget:
                return
            self.drop(name)
            self.evictions += 1

    def room(self, size: int, priority: float, busy: Collection[str] = ()) -> bool:
        """Make room for `size` bytes by dropping copies of lower priority; False if it cannot."""
        victims = self.victims(busy, below=priority)
        if self.used + size - sum(self.copies[n].nbytes for n in victims) > self.budget:
            return False
        self.trim(self.budget - size, busy)
        return self.used + size <= self.budget

    def clear(self) -> None:
        self.copies.clear()
        self.used = 0

    def check(self) -> None:
        """Invariants (tests): the byte count matches the copies."""
        assert self.used == sum(c.nbytes for c in self.copies.values())
