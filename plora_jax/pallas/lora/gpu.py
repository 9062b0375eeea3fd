"""Paged LoRA shrink/expand as Pallas kernels on the Triton backend (GPU).

Layout and semantics: see `reference` (the pure-jnp reference these kernels are tested against).

Every operand is a whole-array block in global memory; each program reads its row's adapter
slot, the slot's page count and page ids as scalars, and loads page rows directly from the
pool, so a token's work is its own adapter's pages and nothing more:

- shrink: grid `(batch, tokens / block_m, max_pages)`. Program (b, t, p) computes
  `x[b, t-tile] @ pool_a[page_table[slot, p]]^T`, looping over the input width in `block_k`
  chunks; programs with `p >= num_pages[slot]` write zeros and do no loads.
- expand: grid `(batch, tokens / block_m, out / block_n)`. Program (b, t, n) loops over the
  slot's `num_pages` pages (a dynamic trip count; 0 for rows without adapter) and adds
  `y @ pool_b[page]` to the base output tile.

Triton wants every loaded shape to be a power of two and dots of at least 16x16x16. Widths are
cut into power-of-two chunks that divide them (`block_k`, `block_n`); tiles of fewer than 16
rows (decode: one token per row) or pages of 8 rows use a broadcast multiply-and-sum instead of
a dot. `supported()` says whether a shape can run here; the dispatcher falls back to XLA if not.

The Triton backend is selected with `plgpu.CompilerParams` (Mosaic GPU is Pallas' default GPU
backend). It is deprecated upstream; a Mosaic GPU port is the planned successor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n (1 if n is odd)."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def block_m_for(tokens: int) -> int:
    return _pow2_divisor(tokens, 16)


def supported(tokens: int, in_width: int, out_width: int, page_rows: int) -> bool:
    """Shapes the Triton kernels accept (power-of-two tiles that divide every dimension)."""
    pow2 = page_rows & (page_rows - 1) == 0
    return pow2 and _pow2_divisor(in_width, 128) >= 16 and _pow2_divisor(out_width, 256) >= 16


def _compiler_params(num_warps: int = 4, num_stages: int = 2):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _matmul_nt(lhs, rhs, use_dot: bool):
    """lhs [m, k] @ rhs [n, k]^T in f32."""
    if use_dot:
        return jax.lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    return jnp.sum(lhs[:, None, :] * rhs[None, :, :], axis=-1)


def _matmul_nn(lhs, rhs, use_dot: bool):
    """lhs [m, k] @ rhs [k, n] in f32."""
    if use_dot:
        return jax.lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), preferred_element_type=_F32)
    return jnp.sum(lhs[:, :, None] * rhs[None, :, :], axis=1)


def _shrink_kernel(slot_ref, table_ref, count_ref, x_ref, pool_ref, y_ref, *, block_m, block_k, width, use_dot):
    b, t, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_rows = pool_ref.shape[1]
    slot = slot_ref[b]
    rows = pl.ds(t * block_m, block_m)
    cols = pl.ds(p * page_rows, page_rows)

    @pl.when(p < count_ref[slot])
    def _():
        page = table_ref[slot, p]

        def step(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            xb = x_ref[b, rows, pl.ds(k0, block_k)].astype(_F32)  # [block_m, block_k]
            w = pool_ref[page, :, pl.ds(k0, block_k)].astype(_F32)  # [page_rows, block_k]
            return acc + _matmul_nt(xb, w, use_dot)

        acc = jax.lax.fori_loop(0, width // block_k, step, jnp.zeros((block_m, page_rows), _F32))
        y_ref[b, rows, cols] = acc

    @pl.when(p >= count_ref[slot])
    def _():
        y_ref[b, rows, cols] = jnp.zeros((block_m, page_rows), _F32)


def _expand_kernel(slot_ref, table_ref, count_ref, y_ref, base_ref, pool_ref, out_ref, *, block_m, block_n, use_dot):
    b, t, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_rows = pool_ref.shape[1]
    slot = slot_ref[b]
    rows = pl.ds(t * block_m, block_m)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

    def step(p, acc):
        page = table_ref[slot, p]
        yb = y_ref[b, rows, pl.ds(p * page_rows, page_rows)]  # [block_m, page_rows] f32
        w = pool_ref[page, :, cols].astype(_F32)  # [page_rows, block_n]
        return acc + _matmul_nn(yb, w, use_dot)

    acc = jax.lax.fori_loop(0, count_ref[slot], step, jnp.zeros((block_m, block_n), _F32))
    out_ref[b, rows, cols] = (base_ref[b, rows, cols].astype(_F32) + acc).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def shrink(x, row_slot, pool_a, page_table, num_pages, *, interpret=False):
    """y [batch, tokens, max_pages * page_rows] f32; see `reference.ref_shrink`."""
    batch, tokens, width = x.shape
    page_rows = pool_a.shape[1]
    max_pages = page_table.shape[1]
    block_m = block_m_for(tokens)
    block_k = _pow2_divisor(width, 128)
    kernel = functools.partial(
        _shrink_kernel,
        block_m=block_m,
        block_k=block_k,
        width=width,
        use_dot=block_m >= 16 and page_rows >= 16 and block_k >= 16,
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, tokens // block_m, max_pages),
        out_shape=jax.ShapeDtypeStruct((batch, tokens, max_pages * page_rows), _F32),
        compiler_params=None if interpret else _compiler_params(),
        interpret=interpret,
        name="plora_shrink",
    )(row_slot, page_table, num_pages, x, pool_a)


@functools.partial(jax.jit, static_argnames=("interpret",))
def expand(y, base, row_slot, pool_b, page_table, num_pages, *, interpret=False):
    """base + y @ B per row's adapter; see `reference.ref_expand`."""
    batch, tokens, out = base.shape
    page_rows = pool_b.shape[1]
    block_m = block_m_for(tokens)
    block_n = _pow2_divisor(out, 256)
    kernel = functools.partial(
        _expand_kernel, block_m=block_m, block_n=block_n, use_dot=block_m >= 16 and page_rows >= 16
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, tokens // block_m, out // block_n),
        out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
        compiler_params=None if interpret else _compiler_params(),
        interpret=interpret,
        name="plora_expand",
    )(row_slot, page_table, num_pages, y, base, pool_b)
