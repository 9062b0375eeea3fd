"""One switch for the paged LoRA kernels: `implementation="auto" | "xla" | "pallas_gpu" | "pallas_tpu"`.

`auto` picks the Pallas kernel of the backend jax runs on (Triton on GPU, Mosaic on TPU) and
the XLA path (`xla.xla_*`) on CPU. A shape a kernel cannot tile (see `gpu.supported`) falls
back to XLA for that call only, at trace time.

Two entry points, one per way a step lays out its tokens:

- `lora_rows`: decode. Row b of `x [batch, in]` is one request with adapter `row_slot[b]`; every
  kernel gathers each row's own pages.
- `lora_groups`: packed prefill. `x [tokens, in]` holds the chunks of several requests back to
  back, token t with adapter `token_slot[t]`; `group_slots` lists the distinct adapters of the
  step (0-padded). Work follows the step's adapters (data, not shape): a step whose tokens share
  one adapter costs one pass over its pages, a step without adapters none; each pass keeps only
  its own adapter's tokens.

Both take every projection that reads the same input at once (q, k, v; gate, up), so the XLA
path runs one fused loop for them (see `xla`); the Pallas kernels run per projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...names import LORA_IMPLEMENTATIONS
from . import xla

IMPLEMENTATIONS = LORA_IMPLEMENTATIONS  # one list, in plora_jax.names


def resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"lora implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")


def lora_delta_apply(x, base, row_slot, pool_a, pool_b, page_table, num_pages, implementation: str = "auto"):
    """base + LoRA(x) for each row's adapter: shrink then expand, through the chosen kernels.

    x [batch, tokens, in], base [batch, tokens, out], row_slot [batch] i32,
    pool_a [num_pages, page_rows, in], pool_b [num_pages, page_rows, out],
    page_table [max_slots, max_pages] i32, num_pages [max_slots] i32.
    """
    impl = resolve(implementation)
    if impl == "pallas_gpu":
        from . import gpu

        _, tokens, width = x.shape
        if gpu.supported(tokens, width, base.shape[-1], pool_a.shape[1]):
            y = gpu.shrink(x, row_slot, pool_a, page_table, num_pages)
            return gpu.expand(y, base, row_slot, pool_b, page_table, num_pages)
        impl = "xla"
    if impl == "pallas_tpu":
        from . import tpu

        y = tpu.shrink(x, row_slot, pool_a, page_table, num_pages)
        return tpu.expand(y, base, row_slot, pool_b, page_table, num_pages)
    y = xla.xla_shrink(x, row_slot, pool_a, page_table, num_pages)
    return xla.xla_expand(y, base, row_slot, pool_b, page_table, num_pages)


def lora_rows(x, bases, row_slot, pools_a, pools_b, page_table, num_pages, implementation: str = "auto"):
    """Decode, feature-major (the model's layout): x [in, batch] feeds every projection in
    `bases` (one [out, batch] each, with its `pools_a`/`pools_b` pair); returns each base plus
    its rows' deltas."""
    impl = resolve(implementation)
    if impl == "xla":
        deltas = xla.rows_deltas(x, row_slot, pools_a, pools_b, page_table, num_pages)
        return tuple((b.astype(jnp.float32) + d).astype(b.dtype) for b, d in zip(bases, deltas, strict=True))
    rows = x.T[:, None]  # the kernels take [batch, tokens, width]
    return tuple(
        lora_delta_apply(rows, b.T[:, None], row_slot, a_pool, b_pool, page_table, num_pages, impl)[:, 0].T
        for b, a_pool, b_pool in zip(bases, pools_a, pools_b, strict=True)
    )


def lora_groups(x, bases, token_slot, group_slots, pools_a, pools_b, page_table, num_pages, implementation="auto"):
    """Packed prefill, feature-major: x [in, tokens] feeds every projection in `bases` ([out,
    tokens] each); token_slot [tokens] i32, group_slots [max_groups] i32 (the step's distinct
    adapter slots first, then zeros)."""
    impl = resolve(implementation)
    if impl == "xla":
        deltas = xla.groups_deltas(x, token_slot, group_slots, pools_a, pools_b, page_table, num_pages)
        return tuple((b.astype(jnp.float32) + d).astype(b.dtype) for b, d in zip(bases, deltas, strict=True))
    group_slots, token_slot, rows = jnp.asarray(group_slots), jnp.asarray(token_slot), jnp.asarray(x).T
    num_groups = jnp.sum(group_slots > 0)

    def one_adapter(g, accs):
        slot = group_slots[g]
        mine = (token_slot == slot)[:, None]
        xg = jnp.where(mine, rows, jnp.zeros_like(rows))  # other adapters' tokens contribute nothing
        # ...and their outputs are selected, not added: 0 x a non-finite page would be NaN.
        return tuple(
            jnp.where(
                mine,
                lora_delta_apply(xg[None], acc[None], slot[None], a_pool, b_pool, page_table, num_pages, impl)[0],
                acc,
            )
            for acc, a_pool, b_pool in zip(accs, pools_a, pools_b, strict=True)
        )

    accs = jax.lax.fori_loop(0, num_groups, one_adapter, tuple(b.T for b in bases))
    return tuple(acc.T for acc in accs)
