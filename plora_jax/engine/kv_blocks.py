"""Host-side allocator of KV-cache blocks (numpy only; owned by whoever schedules steps).

Block 0 is reserved and never handed out: padding tokens write into it and padded block-table
entries point at it, so a read through a padding entry sees garbage that attention masks, never
another sequence's data. Blocks are reference counted so that a block shared by several
sequences (a later prefix cache) returns to the free list only when its last user lets go.
"""

from __future__ import annotations

import numpy as np


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for the request (the caller waits, preempts or rejects)."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        # Stack of free ids; popping from the end hands out low ids first.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refcount = np.zeros(num_blocks, np.int32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks - 1}")
        blocks = [self._free.pop() for _ in range(n)]
        self._refcount[blocks] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b <= 0 or self._refcount[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return int(self._refcount[block])
