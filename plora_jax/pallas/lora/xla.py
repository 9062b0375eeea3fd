"""Paged LoRA shrink/expand as XLA loops: the path the engine runs on CPU (and the fallback of
the Pallas kernels for shapes they cannot tile). Layout and semantics: see `reference`.

`xla_shrink`/`xla_expand` loop over page index p only up to the largest page count among this
call's rows (a dynamic trip count: rows of rank 8 never pay for a rank-128 neighbour's absent
pages beyond the batch's own maximum), gathering one page per row per iteration.

What the model runs are the fused forms, `rows_deltas` (decode) and `groups_deltas` (packed
prefill): one loop for every projection that reads the same input (q, k and v; gate and up),
and shrink and expand in the same iteration, since page p of A only ever meets page p of B:
`delta = sum_p (x @ A_p^T) @ B_p`. An adapter's pages have the same ids in every projection's
pool, so one page id serves them all. Four loops per layer instead of fourteen: XLA compiles
each while loop as its own computation, and on the unrolled model that was most of the
compile time (measured: 15-17 s against 2-4 s per executable without LoRA).

`groups_deltas` walks the (adapter, page) pairs of a step's distinct adapters as one flat
loop: its trip count is the sum of their page counts, so a step of one rank-8 adapter runs one
iteration and a step without adapters none. Each iteration keeps only its adapter's tokens.

Isolation: an iteration zeroes the shrink output of other adapters' tokens, then multiplies by
B; 0 x Inf is NaN, so a page's non-finite entries are zeroed first (a page is `page_rows x
width`, a few KB: nothing beside the token-wide products). Whatever an adapter's pages hold,
the tokens of the requests packed with it get exactly 0 from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


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


def rows_deltas(x, row_slot, pools_a, pools_b, page_table, num_pages):
    """Decode, feature-major: x [in, batch], row_slot [batch]; pools_a/pools_b: one
    `[num_pages, page_rows, *]` pair per projection reading x -> each delta [out, batch] (f32)."""
    pages, trips = _row_pages(row_slot, page_table, num_pages)
    x32 = jnp.asarray(x, _F32)
    pools_a, pools_b = tuple(map(jnp.asarray, pools_a)), tuple(map(jnp.asarray, pools_b))

    def body(p, deltas):
        ids = pages[:, p]  # [batch]; rows past their count read page 0 (zeros)
        out = []
        for pool_a, pool_b, delta in zip(pools_a, pools_b, deltas, strict=True):
            y = jnp.einsum("hb,brh->br", x32, pool_a[ids].astype(_F32), precision=_HIGHEST)
            out.append(delta + jnp.einsum("br,brn->nb", y, pool_b[ids].astype(_F32), precision=_HIGHEST))
        return tuple(out)

    init = tuple(jnp.zeros((pool_b.shape[-1], x.shape[1]), _F32) for pool_b in pools_b)
    return jax.lax.fori_loop(0, trips, body, init)


def _finite(page):
    return jnp.where(jnp.isfinite(page), page, 0.0)


def groups_deltas(x, token_slot, group_slots, pools_a, pools_b, page_table, num_pages):
    """Packed prefill, feature-major: x [in, tokens], token_slot [tokens], group_slots
    [max_groups] (the step's distinct adapter slots, 0-padded) -> each delta [out, tokens] (f32)."""
    group_slots, token_slot = jnp.asarray(group_slots), jnp.asarray(token_slot)
    counts = jnp.where(group_slots > 0, jnp.asarray(num_pages)[group_slots], 0)
    ends = jnp.cumsum(counts)
    x32 = jnp.asarray(x, _F32)
    pools_a, pools_b = tuple(map(jnp.asarray, pools_a)), tuple(map(jnp.asarray, pools_b))

    def body(i, deltas):
        g = jnp.sum(ends <= i)  # the adapter whose pages hold iteration i
        slot = group_slots[g]
        page = jnp.asarray(page_table)[slot, i - (ends[g] - counts[g])]
        mine = (token_slot == slot)[None, :]
        out = []
        for pool_a, pool_b, delta in zip(pools_a, pools_b, deltas, strict=True):
            y = jnp.einsum("rh,ht->rt", _finite(pool_a[page].astype(_F32)), x32, precision=_HIGHEST)
            y = jnp.where(mine, y, 0.0)  # other adapters' tokens take nothing from this page
            out.append(delta + jnp.einsum("rn,rt->nt", _finite(pool_b[page].astype(_F32)), y, precision=_HIGHEST))
        return tuple(out)

    init = tuple(jnp.zeros((pool_b.shape[-1], x.shape[1]), _F32) for pool_b in pools_b)
    return jax.lax.fori_loop(0, ends[-1], body, init)
