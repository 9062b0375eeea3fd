"""Bucket tables and the KV block allocator."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plora_jax.buckets import pick_bucket, pow2_buckets
from plora_jax.engine.kv_blocks import BlockAllocator, OutOfBlocks


def test_pow2_buckets():
    assert pow2_buckets(16, 100) == (16, 32, 64, 100)
    assert pow2_buckets(1, 8) == (1, 2, 4, 8)
    assert pow2_buckets(32, 16) == (16,)
    assert pick_bucket(17, (16, 32, 64)) == 32 and pick_bucket(16, (16, 32)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        pick_bucket(65, (16, 32, 64))


def test_block_zero_is_never_allocated_and_errors_are_clear():
    alloc = BlockAllocator(5)
    blocks = alloc.allocate(4)
    assert sorted(blocks) == [1, 2, 3, 4] and alloc.num_free == 0
    with pytest.raises(OutOfBlocks, match="need 1 KV blocks, 0 free of 4"):
        alloc.allocate(1)
    alloc.free(blocks[:2])
    with pytest.raises(ValueError, match="is not allocated"):
        alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="block 0 is not allocated"):
        alloc.free([0])


def test_shared_blocks_return_after_last_user():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.share(blocks)
    alloc.free(blocks)
    assert alloc.num_free == 1 and alloc.refcount(blocks[0]) == 1
    alloc.free(blocks)
    assert alloc.num_free == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), max_size=40))
def test_allocator_invariants(ops):
    alloc = BlockAllocator(16)
    held: list[list[int]] = []
    for is_alloc, n in ops:
        if is_alloc:
            if n <= alloc.num_free:
                held.append(alloc.allocate(n))
            else:
                with pytest.raises(OutOfBlocks):
                    alloc.allocate(n)
        elif held:
            alloc.free(held.pop(n % len(held)))
        owned = [b for h in held for b in h]
        assert 0 not in owned and len(owned) == len(set(owned))
        assert alloc.num_used == len(owned) and alloc.num_free + len(owned) == 15
