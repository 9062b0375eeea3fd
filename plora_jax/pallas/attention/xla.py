"""Paged attention as XLA loops: the portable path (CPU fallback, and prefill on every backend).
Layout and semantics: see `reference`.

Decode. The block table comes at its full width, so one executable serves every context
length; the work follows the data instead: a loop over chunks of `chunk_blocks` blocks whose
trip count is the longest row's length (and, with a sliding window, starts at the first chunk
any row can see). Each iteration gathers whole blocks (rows of a `[kv_heads * blocks, block,
head_dim]` view, never single elements), scores them against every row's queries and folds
them into a running softmax (flash-attention's online rescaling). Keys are turned to
`[head_dim, tokens]` before the scores: XLA:CPU runs `q @ K^T` about 2.5x faster with the
contracted axis outermost (measured; see docs/performance.md).

Prefill (packed). A prompt chunk's own keys are this step's K/V, so they are read from `k`, `v`
directly, densely, with a segment-and-causal mask; only keys written by earlier steps come from
the cache. The scheduler guarantees that only segment 0 can have such keys (a chunk that
continues a prompt is always first in its step); they are read in the same chunked loop as
decode, with a trip count from `seq_starts[0]`.

Masked entries are zeroed after the exponential (a finite mask value alone would give a fully
masked chunk weight 1 per entry), and rows that see no key return zeros, as the reference does.

A masked position never contributes, whatever its K/V hold. Scores are selected (`where`), not
multiplied, so a non-finite key stays in its own rows; values are multiplied by probabilities,
and 0 x Inf is NaN, so every non-finite value is replaced by 0 before the product. Without
that, one segment's NaN V (an adapter gone wrong) would reach every segment packed with it,
and the stale tail of a reused KV block would reach its next owner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import MASK_VALUE

_F32 = jnp.float32


def _online(state, scores, visible, values, spec: str):
    """Fold one chunk of keys into the running (max, sum, acc) of a softmax."""
    m, total, acc = state
    scores = jnp.where(visible, scores, MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    values = jnp.where(jnp.isfinite(values), values, jnp.zeros((), values.dtype))  # 0 x Inf would be NaN
    acc = acc * correction[..., None] + jnp.einsum(spec, p, values, preferred_element_type=_F32)
    return m_new, total * correction + p.sum(-1), acc


def _rows_view(cache):
    kv, blocks, block, d = cache.shape
    return cache.reshape(kv * blocks, block, d)


def xla_decode(
    q, k_cache, v_cache, block_tables, context_lens, sliding_window=None, k_transposed=False, chunk_blocks: int = 8
):
    """q [batch, num_heads, head_dim] -> [batch, num_heads, head_dim]."""
    q, k_cache, v_cache, block_tables, context_lens = map(
        jnp.asarray, (q, k_cache, v_cache, block_tables, context_lens)
    )
    batch, num_heads, head_dim = q.shape
    num_kv, num_blocks, block_size, _ = v_cache.shape
    key_axes = (0, 1, 3, 2, 4) if k_transposed else (0, 1, 4, 2, 3)  # -> [kv, batch, head_dim, cb, block]
    group = num_heads // num_kv
    cb = min(chunk_blocks, block_tables.shape[1])
    width = -(-block_tables.shape[1] // cb) * cb
    tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))
    chunk = cb * block_size
    qs = (q.reshape(batch, num_kv, group, head_dim).astype(_F32) * head_dim**-0.5).transpose(1, 0, 2, 3)
    k_rows, v_rows = _rows_view(k_cache), _rows_view(v_cache)
    head_offset = (jnp.arange(num_kv) * num_blocks)[:, None, None]
    lens = context_lens[None, :, None, None]
    hi = (jnp.max(context_lens) + chunk - 1) // chunk
    lo = 0
    if sliding_window is not None:
        first = jnp.min(jnp.where(context_lens > 0, context_lens - sliding_window, jnp.iinfo(jnp.int32).max))
        lo = jnp.clip(first, 0, None) // chunk

    def body(c, state):
        idx = head_offset + jax.lax.dynamic_slice_in_dim(tables, c * cb, cb, axis=1)[None]  # [kv, batch, cb]
        keys_t = k_rows[idx].transpose(key_axes).reshape(num_kv, batch, head_dim, chunk)
        values = v_rows[idx].reshape(num_kv, batch, chunk, head_dim)
        scores = jnp.einsum("kbgd,kbdc->kbgc", qs, keys_t, preferred_element_type=_F32)
        pos = c * chunk + jnp.arange(chunk)
        visible = pos < lens
        if sliding_window is not None:
            visible &= pos >= lens - sliding_window
        return _online(state, scores, visible, values, "kbgc,kbcd->kbgd")

    init = (
        jnp.full((num_kv, batch, group), MASK_VALUE, _F32),
        jnp.zeros((num_kv, batch, group), _F32),
        jnp.zeros((num_kv, batch, group, head_dim), _F32),
    )
    _, total, acc = jax.lax.fori_loop(lo, hi, body, init)
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
    return out.transpose(1, 0, 2, 3).reshape(batch, num_heads, head_dim).astype(q.dtype)


def xla_prefill(
    q,
    k,
    v,
    k_cache,
    v_cache,
    positions,
    segment_ids,
    block_tables,
    seq_starts,
    sliding_window=None,
    k_transposed=False,
    chunk_blocks=8,
):
    """q [tokens, num_heads, head_dim], this step's k, v [tokens, num_kv_heads, head_dim] ->
    [tokens, num_heads, head_dim]. Only segment 0 may have keys from earlier steps."""
    q, k, v, k_cache, v_cache = map(jnp.asarray, (q, k, v, k_cache, v_cache))
    positions, segment_ids, block_tables, seq_starts = map(
        jnp.asarray, (positions, segment_ids, block_tables, seq_starts)
    )
    tokens, num_heads, head_dim = q.shape
    num_kv, num_blocks, block_size, _ = v_cache.shape
    group = num_heads // num_kv
    qg = (q.reshape(tokens, num_kv, group, head_dim) * head_dim**-0.5).transpose(1, 2, 0, 3)  # [kv, g, t, d]
    query_pos = positions[None, None, :, None]

    # This step's own keys: same segment, causal.
    scores = jnp.einsum("kgtd,skd->kgts", qg, k.astype(q.dtype), preferred_element_type=_F32)
    visible = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[:, None] >= 0)
    visible = visible[None, None] & (positions[None, None, None, :] <= query_pos)
    if sliding_window is not None:
        visible &= positions[None, None, None, :] > query_pos - sliding_window
    init = (
        jnp.full((num_kv, group, tokens), MASK_VALUE, _F32),
        jnp.zeros((num_kv, group, tokens), _F32),
        jnp.zeros((num_kv, group, tokens, head_dim), _F32),
    )
    state = _online(init, scores, visible, v.astype(q.dtype), "kgts,skd->kgtd")

    # Segment 0's keys from earlier steps, through its block table.
    cb = min(chunk_blocks, block_tables.shape[1])
    width = -(-block_tables.shape[1] // cb) * cb
    table = jnp.pad(block_tables[0], (0, width - block_tables.shape[1]))
    chunk = cb * block_size
    cached = seq_starts[0]
    k_rows, v_rows = _rows_view(k_cache), _rows_view(v_cache)
    head_offset = (jnp.arange(num_kv) * num_blocks)[:, None]
    in_first = (segment_ids == 0)[None, None, :, None]

    def body(c, state):
        idx = head_offset + jax.lax.dynamic_slice_in_dim(table, c * cb, cb)[None]  # [kv, cb]
        keys = k_rows[idx]  # [kv, cb, block, head_dim], or [kv, cb, head_dim, block] transposed
        keys_t = (keys.transpose(0, 2, 1, 3) if k_transposed else keys.transpose(0, 3, 1, 2)).reshape(
            num_kv, head_dim, chunk
        )
        values = v_rows[idx].reshape(num_kv, chunk, head_dim)
        scores = jnp.einsum("kgtd,kdc->kgtc", qg, keys_t.astype(q.dtype), preferred_element_type=_F32)
        pos = c * chunk + jnp.arange(chunk)
        visible = in_first & (pos < cached)
        if sliding_window is not None:
            visible &= pos > query_pos - sliding_window
        return _online(state, scores, visible, values.astype(q.dtype), "kgtc,kcd->kgtd")

    _, total, acc = jax.lax.fori_loop(0, (cached + chunk - 1) // chunk, body, state)
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)  # [kv, g, t, d]
    return out.transpose(2, 0, 1, 3).reshape(tokens, num_heads, head_dim).astype(q.dtype)
