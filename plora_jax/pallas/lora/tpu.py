"""Paged LoRA shrink/expand as Pallas TPU (Mosaic) kernels with scalar prefetch.

Layout and semantics: see `reference`. The adapter slot of every row, the flattened page table
and the page counts are scalar-prefetched into SMEM, and the *page is the block*: the pool's
BlockSpec `(None, page_rows, width)` has an index map that reads `page_table[slot, p]`, so the
pipeline DMAs exactly the pages of each row's adapter. For `p >= num_pages[slot]` the index map
repeats the row's last valid page; an unchanged block index issues no copy, and the kernel
body skips the compute with `pl.when`. Work per row therefore follows its own adapter's rank.

- shrink: grid `(batch, tokens / block_m, max_pages)`; output `y3 [batch, max_pages, tokens,
  page_rows]` (its last block dim equals the full dim, which Mosaic's (8, 128) rule allows),
  transposed to `[batch, tokens, max_pages * page_rows]` by XLA afterwards.
- expand: grid `(batch, tokens / block_m, max_pages)`, pages innermost ("arbitrary"), an f32
  VMEM accumulator over the full output width, written as `base + acc` at the last page.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_F32 = jnp.float32


def block_m_for(tokens: int) -> int:
    """A token tile Mosaic accepts: the whole axis, or a multiple of 8 that divides it."""
    if tokens <= 256:
        return tokens
    for m in (256, 128, 64, 32, 16, 8):
        if tokens % m == 0:
            return m
    return tokens


def _page_index(b, p, slot_ref, table_ref, count_ref, max_pages):
    """Page of row b at step p, clamped to the row's last valid page (no new DMA past it)."""
    slot = slot_ref[b]
    last = jnp.maximum(count_ref[slot] - 1, 0)
    return table_ref[slot * max_pages + jnp.minimum(p, last)]


def _shrink_kernel(slot_ref, table_ref, count_ref, x_ref, a_ref, y_ref):
    b, p = pl.program_id(0), pl.program_id(2)

    @pl.when(p < count_ref[slot_ref[b]])
    def _():
        x = x_ref[...]  # [block_m, width]
        a = a_ref[...]  # [page_rows, width]
        y_ref[...] = jax.lax.dot_general(x, a, (((1,), (1,)), ((), ())), preferred_element_type=_F32)

    @pl.when(p >= count_ref[slot_ref[b]])
    def _():
        y_ref[...] = jnp.zeros(y_ref.shape, _F32)


def _expand_kernel(slot_ref, table_ref, count_ref, y_ref, base_ref, b_ref, out_ref, acc_ref):
    b, p = pl.program_id(0), pl.program_id(2)

    @pl.when(p == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

    @pl.when(p < count_ref[slot_ref[b]])
    def _():
        y = y_ref[...].astype(b_ref.dtype)  # [block_m, page_rows]
        acc_ref[...] += jax.lax.dot_general(y, b_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=_F32)

    @pl.when(p == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = (base_ref[...].astype(_F32) + acc_ref[...]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def shrink(x, row_slot, pool_a, page_table, num_pages, *, interpret=False):
    """y [batch, tokens, max_pages * page_rows] f32; see `reference.ref_shrink`."""
    batch, tokens, width = x.shape
    page_rows = pool_a.shape[1]
    max_pages = page_table.shape[1]
    block_m = block_m_for(tokens)
    page = functools.partial(_page_index, max_pages=max_pages)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, tokens // block_m, max_pages),
        in_specs=[
            pl.BlockSpec((None, block_m, width), lambda b, t, p, s, pt, c: (b, t, 0)),
            pl.BlockSpec((None, page_rows, width), lambda b, t, p, s, pt, c: (page(b, p, s, pt, c), 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_m, page_rows), lambda b, t, p, s, pt, c: (b, p, t, 0)),
    )
    y3 = pl.pallas_call(
        _shrink_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((batch, max_pages, tokens, page_rows), _F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="plora_shrink_tpu",
    )(row_slot, page_table.reshape(-1), num_pages, x, pool_a)
    return y3.transpose(0, 2, 1, 3).reshape(batch, tokens, max_pages * page_rows)


@functools.partial(jax.jit, static_argnames=("interpret",))
def expand(y, base, row_slot, pool_b, page_table, num_pages, *, interpret=False):
    """base + y @ B per row's adapter; see `reference.ref_expand`."""
    batch, tokens, out = base.shape
    page_rows = pool_b.shape[1]
    max_pages = page_table.shape[1]
    block_m = block_m_for(tokens)
    page = functools.partial(_page_index, max_pages=max_pages)
    y3 = y.reshape(batch, tokens, max_pages, page_rows).transpose(0, 2, 1, 3)

    def y_map(b, t, p, s, pt, c):
        last = jnp.maximum(c[s[b]] - 1, 0)
        return (b, jnp.minimum(p, last), t, 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, tokens // block_m, max_pages),
        in_specs=[
            pl.BlockSpec((None, None, block_m, page_rows), y_map),
            pl.BlockSpec((None, block_m, out), lambda b, t, p, s, pt, c: (b, t, 0)),
            pl.BlockSpec((None, page_rows, out), lambda b, t, p, s, pt, c: (page(b, p, s, pt, c), 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_m, out), lambda b, t, p, s, pt, c: (b, t, 0)),
        scratch_shapes=[pltpu.VMEM((block_m, out), _F32)],
    )
    return pl.pallas_call(
        _expand_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="plora_expand_tpu",
    )(row_slot, page_table.reshape(-1), num_pages, y3, base, pool_b)
