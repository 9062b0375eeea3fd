"""Paged decode attention on TPU: the Pallas (Mosaic) kernel that ships with jax,
`jax.experimental.pallas.ops.tpu.paged_attention`, on our cache as it is (its layout is ours:
`[num_kv_heads, num_blocks, block_size, head_dim]`). Semantics: `reference.ref_decode`.

The kernel scalar-prefetches lengths and the page table and double-buffers page DMAs into
VMEM, `pages_per_compute_block` pages at a time (a divisor of the table width). It applies no
softmax scale (we scale q) and knows no sliding window (the switch sends windowed models to the
XLA path). Rows of length 0 are zeroed here. Prefill on TPU runs `xla.xla_prefill`. In tests
the kernel runs under `pltpu.force_tpu_interpret_mode()`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ...buckets import divisor_at_most


def decode(q, k_cache, v_cache, block_tables, context_lens):
    """q [batch, num_heads, head_dim] -> [batch, num_heads, head_dim]."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    per_block = divisor_at_most(block_tables.shape[1], 8)
    out = paged_attention(
        q * q.shape[-1] ** -0.5,
        k_cache,
        v_cache,
        context_lens,
        block_tables,
        pages_per_compute_block=per_block,
    )
    return jnp.where((context_lens > 0)[:, None, None], out, 0).astype(q.dtype)
