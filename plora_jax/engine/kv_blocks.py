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


def check_capacity(num_kv_blocks: int, block_size: int, max_model_len: int, adapter_blocks: int = 0) -> None:
    """Refuse a KV cache that cannot hold one sequence of `max_model_len` tokens beside
    `adapter_blocks` (its adapter's blocks, with one budget for KV and adapters): that request
    could never run, whatever else finished or was evicted."""
    need = -(-max_model_len // block_size)
    if need + adapter_blocks > num_kv_blocks - 1:
        beside = f" beside its adapter's {adapter_blocks} (adapter_memory='unified')" if adapter_blocks else ""
        raise ValueError(
            f"num_kv_blocks={num_kv_blocks} cannot hold one sequence of max_model_len={max_model_len} "
            f"({need} blocks of {block_size}){beside}; raise num_kv_blocks"
        )


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
