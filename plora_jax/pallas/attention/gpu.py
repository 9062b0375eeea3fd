"""Paged decode attention on GPU: the Pallas (Triton) kernel that ships with jax,
`jax.experimental.pallas.ops.gpu.paged_attention`, called on our cache as it is (its layout is
ours: `[num_kv_heads, num_blocks, block_size, head_dim]`). Semantics: `reference.ref_decode`.

The kernel splits each row's table into `k_splits` partitions (run in parallel, merged by a
final flash rescaling) and walks each partition in compute blocks of pages; both must divide
the table width, so they are picked from its divisors. It applies no softmax scale (we scale
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
    k_splits = divisor_at_most(width, 16)
    per_block = divisor_at_most(width // k_splits, 8)
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
