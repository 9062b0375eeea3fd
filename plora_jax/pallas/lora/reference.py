"""Paged LoRA shrink/expand in pure jnp: the reference every kernel is tested against.

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
are the semantics every other path (`xla`, `gpu`, `tpu`) is tested against.
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
