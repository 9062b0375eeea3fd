"""One switch for the paged LoRA kernels: `implementation="auto" | "xla" | "pallas_gpu" | "pallas_tpu"`.

`auto` picks the Pallas kernel of the backend jax runs on (Triton on GPU, Mosaic on TPU) and
the XLA path (`lora_ref.xla_*`) on CPU. A shape a kernel cannot tile (see
`lora_gpu.supported`) falls back to XLA for that call only, at trace time.
"""

from __future__ import annotations

import jax

from . import lora_ref

IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


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
        from . import lora_gpu

        _, tokens, width = x.shape
        if lora_gpu.supported(tokens, width, base.shape[-1], pool_a.shape[1]):
            y = lora_gpu.shrink(x, row_slot, pool_a, page_table, num_pages)
            return lora_gpu.expand(y, base, row_slot, pool_b, page_table, num_pages)
        impl = "xla"
    if impl == "pallas_tpu":
        from . import lora_tpu

        y = lora_tpu.shrink(x, row_slot, pool_a, page_table, num_pages)
        return lora_tpu.expand(y, base, row_slot, pool_b, page_table, num_pages)
    y = lora_ref.xla_shrink(x, row_slot, pool_a, page_table, num_pages)
    return lora_ref.xla_expand(y, base, row_slot, pool_b, page_table, num_pages)
