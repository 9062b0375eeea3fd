"""One switch for paged attention: `implementation="auto" | "xla" | "cpu" | "pallas_gpu" | "pallas_tpu"`.

`resolve` turns the configured name into the decode path of this process, once, at engine
build: on CPU the C++ FFI kernel (`cpu`) where it built and the shape is one it instantiates
(float32, block size 16, head_dim 64 or 128), else `xla`; on GPU jax's Pallas Triton kernel;
on TPU jax's Pallas Mosaic kernel. Models with a sliding window run the XLA path on GPU and TPU
(jax's kernels have none). The resolved name also fixes the K cache layout (`k_transposed`:
only the CPU kernel wants K blocks transposed), so the model asks `k_transposed(impl)` when it
allocates and writes the cache.

Prefill runs `xla.xla_prefill` everywhere: it is matmul-bound, and dense in-chunk attention plus
one chunked loop over earlier keys is what XLA compiles well on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...names import ATTENTION_IMPLEMENTATIONS
from . import cpu, xla
from .reference import write_kv

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS  # one list, in plora_jax.names

__all__ = ["IMPLEMENTATIONS", "decode", "k_transposed", "prefill", "resolve", "write_kv"]


def resolve(implementation: str, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype) -> str:
    """The concrete decode path for this model and cache shape on this backend."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    cpu_ok = jnp.dtype(dtype) == jnp.float32 and cpu.supported(num_heads // num_kv_heads, head_dim, block_size)
    if implementation == "cpu":
        if not cpu_ok:
            raise ValueError(
                f"the CPU attention kernel takes float32, block_size 16 and head_dim 64 or 128 with "
                f"{cpu.GROUPS} query heads per KV head; got {jnp.dtype(dtype).name}, block_size {block_size}, "
                f"head_dim {head_dim}, {num_heads // num_kv_heads} query heads per KV head"
            )
        return "cpu"
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu" if cpu_ok and cpu.available() else "xla"
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")


def k_transposed(implementation: str) -> bool:
    """Whether K blocks are stored `[head_dim, block_size]` (see `reference`)."""
    return implementation == "cpu"


def decode(q, k_cache, v_cache, block_tables, context_lens, sliding_window=None, implementation: str = "xla"):
    """q [batch, num_heads, head_dim] against each row's blocks -> [batch, num_heads, head_dim].
    `implementation` is a name `resolve` returned."""
    if implementation == "cpu":
        return cpu.decode(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    if implementation == "pallas_gpu" and sliding_window is None:
        from . import gpu

        return gpu.decode(q, k_cache, v_cache, block_tables, context_lens)
    if implementation == "pallas_tpu" and sliding_window is None:
        from . import tpu

        return tpu.decode(q, k_cache, v_cache, block_tables, context_lens)
    return xla.xla_decode(q, k_cache, v_cache, block_tables, context_lens, sliding_window, k_transposed(implementation))


def prefill(
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
    implementation="xla",
):
    """Packed prefill (see `reference.ref_prefill`) -> [tokens, num_heads, head_dim]."""
    return xla.xla_prefill(
        q,
        k,
        v,
        k_cache,
        v_cache,
        positions,
        segment_ids,
        block_tables,
        seq_starts,
        sliding_window,
        k_transposed(implementation),
    )
