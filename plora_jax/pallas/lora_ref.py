"""Paged LoRA shrink/expand in pure jnp: the reference every kernel is tested against, and the
XLA path the engine runs on CPU.

Layout (shared with the Pallas kernels in this package). One layer of one projection:

- `pool`: `[num_pages, page_rows, width]`. A page holds `page_rows` rank rows of one adapter:
  rows of A^T (width = the projection's input size) or rows of B (width = its output size).
  Page 0 is all zeros and never handed out; rows past an adapter's rank inside its last page
  are zero too, so nothing below needs a rank mask.
- `page_table`: `[max_slots, max_pages]` i32, the pages of the adapter in each `adapter_slot`,
  0-padded; `num_pages`: `[max_slots]` i32. Slot 0 means "no adapter" (no pages).
- `row_slot`: `[batch]` i32, the adapter slot of each row of `x` `[batch, tokens, width]`. A
  row is one request, so every token of a row shares its adapter: a prefill row is already a
  group of tokens of one adapter, a decode row is one token.

The LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into B when an adapter
is laid out, so expand is a plain accumulate into the base output.

`ref_shrink`/`ref_expand` gather every row's full page list (work at the maximum rank): they
are the semantics. `xla_shrink`/`xla_expand` loop over page index p only up to the largest
page count among this call's rows (a dynamic trip count: rows of rank 8 never pay for a
rank-128 neighbour's absent pages beyond the batch's own maximum), gathering one page per row
per iteration. This is what runs on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def dense_pages(pool: jax.Array, page_table: jax.Array) -> jax.Array:
    """[max_slots, max_pages * page_rows, width]: each slot's pages laid end to end."""
    return pool[page_table].reshape(page_table.shape[0], -1, pool.shape[-1])


def ref_shrink(x, row_slot, pool_a, page_table, num_pages):
    """y [batch, tokens, max_pages * page_rows] f32 = x @ A^T for each row's adapter."""
    del num_pages  # pages past the count are page 0 (zeros) by construction
    a = dense_pages(pool_a, page_table)[row_slot]  # [batch, rank_rows, width]
    return jnp.einsum("bth,brh->btr", x.astype(_F32), a.astype(_F32), precision=_HIGHEST)


def ref_expand(y, base, row_slot, pool_b, page_table, num_pages):
    """base + y @ B for each row's adapter, in base's dtype (rows of slot 0 keep base)."""
    del num_pages
    b = dense_pages(pool_b, page_table)[row_slot]  # [batch, rank_rows, out]
    delta = jnp.einsum("btr,brn->btn", y.astype(_F32), b.astype(_F32), precision=_HIGHEST)
    out = jnp.where((row_slot > 0)[:, None, None], base.astype(_F32) + delta, base.astype(_F32))
    return out.astype(base.dtype)


def _row_pages(row_slot, page_table, num_pages):
    row_slot, page_table, num_pages = jnp.asarray(row_slot), jnp.asarray(page_table), jnp.asarray(num_pages)
    pages = page_table[row_slot]  # [batch, max_pages]
    trips = jnp.max(jnp.where(row_slot > 0, num_pages[row_slot], 0))
    return pages, trips


def xla_shrink(x, row_slot, pool_a, page_table, num_pages):
    """Same result as `ref_shrink`; work follows the batch's largest page count."""
    batch, tokens, _ = x.shape
    page_rows = pool_a.shape[1]
    pages, trips = _row_pages(row_slot, page_table, num_pages)
    pool_a, x32 = jnp.asarray(pool_a), jnp.asarray(x, _F32)

    def body(p, y):
        a = pool_a[pages[:, p]].astype(_F32)  # [batch, page_rows, width]
        part = jnp.einsum("bth,brh->btr", x32, a, precision=_HIGHEST)
        return jax.lax.dynamic_update_slice(y, part, (0, 0, p * page_rows))

    y = jnp.zeros((batch, tokens, page_table.shape[1] * page_rows), _F32)
    return jax.lax.fori_loop(0, trips, body, y)


def xla_expand(y, base, row_slot, pool_b, page_table, num_pages):
    """Same result as `ref_expand`; work follows the batch's largest page count."""
    page_rows = pool_b.shape[1]
    pages, trips = _row_pages(row_slot, page_table, num_pages)
    pool_b, y, base = jnp.asarray(pool_b), jnp.asarray(y), jnp.asarray(base)

    def body(p, acc):
        b = pool_b[pages[:, p]].astype(_F32)  # [batch, page_rows, out]
        part = jax.lax.dynamic_slice_in_dim(y, p * page_rows, page_rows, axis=2).astype(_F32)
        return acc + jnp.einsum("btr,brn->btn", part, b, precision=_HIGHEST)

    delta = jax.lax.fori_loop(0, trips, body, jnp.zeros(base.shape, _F32))
    # Rows without an adapter gather page 0 (zeros) or skip the loop: delta is exactly 0 there.
    return (base.astype(_F32) + delta).astype(base.dtype)
