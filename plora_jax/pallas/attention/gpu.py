"""Paged decode attention on GPU: the Pallas (Triton) kernel that ships with jax,
`jax.experimental.pallas.ops.gpu.paged_attention`, called on our cache as it is (its layout is
ours: `[num_kv_heads, num_blocks, block_size, head_dim]`). Semantics: `reference.ref_decode`.

The kernel splits each row's table into `k_splits` partitions (run in parallel, merged by a
final flash rescaling) and walks each partition in compute blocks of pages; both must divide
the table width, and Triton wants the compute block (a slice of the table) to be a power of two.
A table width with no such divisor (33 pages for a 528-token context) is padded with the
reserved block 0 up to a multiple of the compute block: the kernel never reads past a row's
length, so the padding costs a few table entries and nothing else. It applies no softmax scale (we scale
q) and knows no sliding window (the switch sends windowed models to the XLA path). Prefill on
GPU runs `xla.xla_prefill`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ...buckets import divisor_at_most


def decode(q, k_cache, v_cache, block_tables, context_lens, interpret: bool = False):
    """q [batch, num_heads, head_dim] -> [batch, num_heads, head_dim]."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    width = block_tables.shape[1]
    per_block = 8 if width >= 8 else 1 << (width - 1).bit_length()  # a power of two
    padded = -(-width // per_block) * per_block
    if padded != width:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, padded - width)))
    k_splits = divisor_at_most(padded // per_block, 16)
    out = paged_attention(
        q * q.shape[-1] ** -0.5,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        k_splits=k_splits,
        pages_per_compute_block=per_block,
        interpret=interpret,
    )
    return jnp.where((context_lens > 0)[:, None, None], out, 0).astype(q.dtype)
