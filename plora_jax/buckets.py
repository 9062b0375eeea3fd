"""Bucket tables: every size that reaches a compiled shape is rounded up to one of a few values.

Counts are data, sizes are buckets: a batch of 5 rows runs in the 8-row executable with 3
padding rows, a 37-token prompt in the 64-token one. Each table is a short tuple, so warm-up
can compile every entry and steady state never compiles. No jax import here: the scheduler and
tests use these on the host.
"""

from __future__ import annotations

import bisect


def pow2_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, 4*smallest, ... and finally `largest` itself (never rounded past it)."""
    if smallest <= 0 or largest <= 0:
        raise ValueError(f"bucket bounds must be > 0, got {smallest=} {largest=}")
    sizes = []
    size = min(smallest, largest)
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return tuple(sizes)


def step_buckets(smallest: int, largest: int, step: int) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `step`, then multiples of `step`, then `largest`:
    padding stays under `step` (a fraction of the size) where a pow2 table could pad by half."""
    sizes = [s for s in pow2_buckets(smallest, min(step, largest))]
    size = sizes[-1] + step
    while size < largest:
        sizes.append(size)
        size += step
    if sizes[-1] != largest:
        sizes.append(largest)
    return tuple(sizes)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"size {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of `n` that is <= `cap` (kernel tile counts that divide a table width)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)
