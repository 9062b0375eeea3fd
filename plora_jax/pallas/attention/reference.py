"""Paged attention in pure jnp: the semantics every other path (`xla`, `cpu`, `gpu`, `tpu`) is
tested against. Written for clarity, not speed: every query gathers its row's whole table.

Layout (shared by every path in this package). One layer of the paged KV cache:

- `k_cache`, `v_cache`: `[num_kv_heads, num_blocks, block_size, head_dim]`, the layout of the
  paged-attention kernels that ship with jax (GPU and TPU), so those kernels read our cache as
  it is. Block 0 is reserved: padding tokens write there and padded table entries point there.
  With `k_transposed` (the CPU kernel's layout, see `cpu`), each K block is stored transposed,
  `[num_kv_heads, num_blocks, head_dim, block_size]`; V keeps the layout above.
- `block_tables`: `[rows, max_blocks]` i32, each row's blocks in order, 0-padded.

A step writes its new K/V into the cache first (see `write_kv`), then attends; so the cache
holds every key a query may see, its own included.

Decode: row b has one query, at position `context_lens[b] - 1`, which sees keys at positions
`[0, context_lens[b])` (and, with a sliding window w, only the last w of them). Padding rows
have `context_lens == 0`; their output is zeros.

Prefill (packed): `T` query tokens from up to `S` sequences ("segments") laid end to end. Token
t belongs to segment `segment_ids[t]` (-1: padding) at position `positions[t]`, and sees the
keys of its own segment at positions `<= positions[t]` (causal; with a window, the last w).
A segment's keys at positions `< seq_starts[s]` were written by earlier steps and are read
through `block_tables[s]`; the rest are this step's own tokens. Padding tokens' outputs are
zeros.

Grouped-query attention: query head h reads KV head `h // (num_heads // num_kv_heads)`.
Softmax runs in float32 with scale `head_dim ** -0.5`.

A position a query does not see never contributes to its output, whatever the cache holds
there (another segment's keys, a reused block's stale tail, even Inf or NaN): its score is
selected away and its value is selected away before the product, not multiplied by a zero
probability (0 x NaN is NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite: a fully masked row softmaxes to uniform instead of NaN
_F32 = jnp.float32


def write_kv(k_cache, v_cache, k, v, slot_mapping, k_transposed: bool = False):
    """Write k, v [tokens, num_kv_heads, head_dim] at flat slots `block * block_size + offset`.

    Non-finite entries are written as 0: the cache only ever holds finite values, so a kernel
    that multiplies a masked position's zero probability by its value (jax's GPU and TPU
    paged-attention kernels read whole pages, stale tails included) gets 0, never NaN. A row
    whose own K/V overflowed is garbage either way; what this protects is every other row."""
    block_size = v_cache.shape[2]
    k = jnp.where(jnp.isfinite(k), k, jnp.zeros((), k.dtype))
    v = jnp.where(jnp.isfinite(v), v, jnp.zeros((), v.dtype))
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    # Index (block, offset) of the 4-D cache rather than a flat slot axis: reshaping a donated
    # buffer makes XLA:CPU copy the whole cache for a one-token write; this form is in place.
    if k_transposed:  # the indexed axes are not adjacent: numpy puts the token axis first
        k_cache = k_cache.at[:, blocks, :, offsets].set(k.astype(k_cache.dtype))
    else:
        k_cache = k_cache.at[:, blocks, offsets].set(jnp.swapaxes(k, 0, 1).astype(k_cache.dtype))
    v_cache = v_cache.at[:, blocks, offsets].set(jnp.swapaxes(v, 0, 1).astype(v_cache.dtype))
    return k_cache, v_cache


def k_blocks(k_cache, k_transposed: bool):
    """The K cache as `[num_kv_heads, num_blocks, block_size, head_dim]` whatever its layout."""
    return jnp.swapaxes(k_cache, 2, 3) if k_transposed else k_cache


def gather_rows(cache, block_tables):
    """[rows, num_kv_heads, max_blocks * block_size, head_dim]: each row's blocks end to end."""
    g = cache[:, block_tables]  # [kv, rows, max_blocks, block, d]
    kv, rows, width, block, d = g.shape
    return jnp.transpose(g, (1, 0, 2, 3, 4)).reshape(rows, kv, width * block, d)


def _attend(q, keys, values, visible):
    """q [n, H, D]; keys/values [n, KV, S, D]; visible [n, S] -> [n, H, D] (zeros where none visible)."""
    n, num_heads, head_dim = q.shape
    num_kv = keys.shape[1]
    qg = q.reshape(n, num_kv, num_heads // num_kv, head_dim).astype(_F32)
    scores = jnp.einsum("nkgd,nksd->nkgs", qg, keys.astype(_F32), precision="highest") * head_dim**-0.5
    scores = jnp.where(visible[:, None, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    values = jnp.where(visible[:, None, :, None], values.astype(_F32), 0.0)
    out = jnp.einsum("nkgs,nksd->nkgd", probs, values, precision="highest")
    out = jnp.where(visible.any(-1)[:, None, None, None], out, 0.0)
    return out.reshape(n, num_heads, head_dim).astype(q.dtype)


def ref_decode(q, k_cache, v_cache, block_tables, context_lens, sliding_window=None, k_transposed=False):
    """q [batch, num_heads, head_dim] -> [batch, num_heads, head_dim]."""
    keys = gather_rows(k_blocks(k_cache, k_transposed), block_tables)
    values = gather_rows(v_cache, block_tables)
    pos = jnp.arange(keys.shape[2])[None, :]
    lens = context_lens[:, None]
    visible = pos < lens
    if sliding_window is not None:
        visible &= pos >= lens - sliding_window
    return _attend(q, keys, values, visible)


def ref_prefill(
    q, k, v, k_cache, v_cache, positions, segment_ids, block_tables, seq_starts, sliding_window=None, k_transposed=False
):
    """q [tokens, num_heads, head_dim] of a packed prefill -> [tokens, num_heads, head_dim]. The
    cache already holds this step's K/V, so the reference reads every key from it (k, v
    [tokens, num_kv_heads, head_dim], this step's, are there for the other paths' signature)."""
    del k, v, seq_starts
    seg = jnp.maximum(segment_ids, 0)
    keys = gather_rows(k_blocks(k_cache, k_transposed), block_tables)[seg]  # [tokens, kv, S, d]
    values = gather_rows(v_cache, block_tables)[seg]
    pos = jnp.arange(keys.shape[2])[None, :]
    query_pos = positions[:, None]
    visible = (pos <= query_pos) & (segment_ids[:, None] >= 0)
    if sliding_window is not None:
        visible &= pos > query_pos - sliding_window
    return _attend(q, keys, values, visible)
