"""Flax (linen) Llama: RMSNorm, RoPE (with Llama-3 scaling), grouped-query attention, SwiGLU.

One forward serves every phase. A step's tokens are a flat list `[tokens]` with a metadata
pytree that says how they attend (see `plora_jax.engine.state`):

- `DecodeMetadata`: token b is row b's newest token; it attends over its row's blocks.
- `PrefillMetadata`: the chunks of several requests packed end to end; each token attends
  causally within its own request (its segment), and segment 0 also over its earlier blocks.

Each token first writes its K/V into the paged cache at its `slot_mapping`, then the attention
op (`plora_jax.pallas.attention.ops`: a kernel or an XLA path, chosen once per engine) reads
what it needs. Decode and prefill are two executables of the same module: the metadata type is
static, so each traces only its own branch.

Activations are feature-major, `[features, tokens]`, and every projection is `W @ x` with W
stored `[out, in]` (the layout of Hugging Face and GGUF checkpoints). On XLA:CPU that runs a
decode step's matmuls 1.2-1.4x faster than `x @ W` at 8-64 rows (its GEMM packs the small
operand better; measured in docs/performance.md) and prefill within 5%; accelerators pick
their own physical layouts. Attention and RoPE see `[tokens, heads, head_dim]` (one small
transpose each way).

Layers are unrolled in Python, one parameter subtree (`layers_{i}`) and one KV buffer per layer.
On XLA:CPU that decodes 1.5-3x faster than a scan over stacked weights (a slice of a stacked
operand is copied or feeds a slow dot; measured in docs/performance.md); it costs compile time,
which the engine pays once (its executables are cached on disk).

LoRA: with a `LoraBatch` (the paged adapter pool and each token's `adapter_slot`), every
projection adds its tokens' adapter deltas through `plora_jax.pallas.lora.ops`: per row in
decode, per adapter in a packed prefill, the projections that share an input together (see
`_projs`). Without one, the forward has no LoRA
code at all.

Precision: matmuls run in the parameter dtype (float32 or bfloat16); RMSNorm statistics, RoPE
and softmax run in float32, and logits are returned in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..engine.state import DecodeMetadata, KVCache, PrefillMetadata
from ..lora.device_pool import LoraBatch
from ..pallas.attention import ops as attention
from ..pallas.lora.ops import lora_groups, lora_rows


class RMSNorm(nn.Module):
    """RMS norm over the feature axis of x [features, tokens]."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[0],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + self.eps)
        return scale[:, None] * normed.astype(self.dtype)


class Linear(nn.Module):
    """y = W x for x [in, tokens]; W `weight` [out, in], no bias."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal(in_axis=1, out_axis=0)
        weight = self.param("weight", init, (self.features, x.shape[0]), self.dtype)
        return jnp.dot(weight, x.astype(self.dtype))


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [tokens, head_dim // 2] (float32) for integer positions [tokens]."""
    inv_freq = jnp.asarray(config.rope.inv_freq(config.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [tokens, heads, head_dim] in the half-split layout (HF's rotate_half)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _projs(specs, x, lora: LoraBatch | None, layer: int, dtype, implementation: str) -> list:
    """W x for each (name, features) in `specs` (projections sharing the input x [in, tokens]),
    plus each token's LoRA deltas for those that carry adapter pages; each [out, tokens].

    The pool holds all layers; it is viewed as one `[layers * pages, ...]` pool and this layer's
    page ids are offset by `layer * pages`, so no per-layer slice of the pool is ever copied.
    """
    outs = [Linear(features, dtype, name=name)(x) for name, features in specs]
    if lora is None:
        return outs
    pool = lora.pool
    adapted = [i for i, (name, _) in enumerate(specs) if name in pool.a]
    if not adapted:
        return outs
    flat = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
    pools_a = tuple(flat(pool.a[specs[i][0]]) for i in adapted)
    pools_b = tuple(flat(pool.b[specs[i][0]]) for i in adapted)
    table = pool.page_table + layer * pool.a[specs[adapted[0]][0]].shape[1]
    bases = tuple(outs[i] for i in adapted)
    if lora.group_slots is None:
        new = lora_rows(x, bases, lora.token_slot, pools_a, pools_b, table, pool.num_pages, implementation)
    else:
        new = lora_groups(
            x, bases, lora.token_slot, lora.group_slots, pools_a, pools_b, table, pool.num_pages, implementation
        )
    for i, out in zip(adapted, new, strict=True):
        outs[i] = out
    return outs


class Attention(nn.Module):
    config: ModelConfig
    dtype: Any
    layer: int
    lora_implementation: str = "xla"
    attention_implementation: str = "xla"

    @nn.compact
    def __call__(self, x, k_cache, v_cache, meta, cos, sin, lora=None):
        """x [hidden, tokens] -> ([hidden, tokens], k_cache, v_cache)."""
        cfg = self.config
        tokens = x.shape[1]

        def projs(specs, inputs):
            return _projs(specs, inputs, lora, self.layer, self.dtype, self.lora_implementation)

        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = projs((("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)), x)
        q = apply_rope(q.T.reshape(tokens, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.T.reshape(tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.T.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)

        impl = self.attention_implementation
        transposed = attention.k_transposed(impl)
        k_cache, v_cache = attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping, transposed)
        if isinstance(meta, DecodeMetadata):
            out = attention.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, cfg.sliding_window, impl)
        else:
            out = attention.prefill(
                q,
                k,
                v,
                k_cache,
                v_cache,
                meta.positions,
                meta.segment_ids,
                meta.block_tables,
                meta.seq_starts,
                cfg.sliding_window,
                impl,
            )
        (out,) = projs((("o_proj", cfg.hidden_size),), out.reshape(tokens, -1).T.astype(self.dtype))
        return out, k_cache, v_cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any
    layer: int
    lora_implementation: str = "xla"

    @nn.compact
    def __call__(self, x, lora=None):
        cfg = self.config

        def projs(specs, inputs):
            return _projs(specs, inputs, lora, self.layer, self.dtype, self.lora_implementation)

        gate, up = projs((("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)), x)
        (down,) = projs((("down_proj", cfg.hidden_size),), nn.silu(gate) * up)
        return down


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Any
    layer: int
    lora_implementation: str = "xla"
    attention_implementation: str = "xla"

    @nn.compact
    def __call__(self, x, k_cache, v_cache, meta, cos, sin, lora):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        attn = Attention(
            cfg, self.dtype, self.layer, self.lora_implementation, self.attention_implementation, name="self_attn"
        )
        attn_out, k_cache, v_cache = attn(h, k_cache, v_cache, meta, cos, sin, lora)
        x = x + attn_out
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, self.dtype, self.layer, self.lora_implementation, name="mlp")(h, lora)
        return x, k_cache, v_cache


class Llama(nn.Module):
    """Decoder-only Llama. `__call__` returns (logits float32, updated KV cache).

    `logits_indices` selects the tokens whose logits are computed (the last token of each
    prefill segment) so the vocabulary projection, this model's largest matmul, runs on those
    rows only. Without it, logits of every token are returned (decode rows, scoring).

    `lora_implementation` and `attention_implementation` are resolved names (see the `resolve`
    of `plora_jax.pallas.lora.ops` and `plora_jax.pallas.attention.ops`).
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    lora_implementation: str = "xla"
    attention_implementation: str = "xla"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [padded_tokens] i32
        kv: KVCache,
        meta: DecodeMetadata | PrefillMetadata,
        logits_indices: jax.Array | None = None,  # [rows] i32
        lora: LoraBatch | None = None,
    ):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="embed_tokens")
        x = embed(tokens).T  # [hidden, tokens]
        cos, sin = rope_tables(cfg, meta.positions)
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            layer = DecoderLayer(
                cfg, self.dtype, i, self.lora_implementation, self.attention_implementation, name=f"layers_{i}"
            )
            x, k_cache, v_cache = layer(x, kv.k[i], kv.v[i], meta, cos, sin, lora)
            new_k.append(k_cache)
            new_v.append(v_cache)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        if logits_indices is not None:
            x = x[:, logits_indices]
        if cfg.tie_word_embeddings:
            logits = jnp.dot(embed.embedding, x)  # [vocab, rows]
        else:
            logits = Linear(cfg.vocab_size, self.dtype, name="lm_head")(x)
        return logits.T.astype(jnp.float32), KVCache(tuple(new_k), tuple(new_v))


def param_shapes(config: ModelConfig, dtype) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating (used to validate loaders)."""
    model = Llama(config, dtype)
    layer_kv = jax.ShapeDtypeStruct((config.num_kv_heads, 2, 1, config.head_dim), dtype)
    kv = KVCache((layer_kv,) * config.num_layers, (layer_kv,) * config.num_layers)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    meta = DecodeMetadata(positions=i32(1), slot_mapping=i32(1), block_tables=i32(1, 1), context_lens=i32(1))
    variables = jax.eval_shape(lambda t, k, m: model.init(jax.random.PRNGKey(0), t, k, m), i32(1), kv, meta)
    return variables["params"]


def layer_params(params: dict, config: ModelConfig) -> list[dict]:
    """The per-layer subtrees `layers_0 ... layers_{n-1}`, in order."""
    return [params[f"layers_{i}"] for i in range(config.num_layers)]


def init_params(config: ModelConfig, dtype, seed: int = 0, scale: float = 0.02) -> dict:
    """Random parameters (normal * scale, norms at 1) in numpy: tiny test models and benchmarks."""
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        if "layernorm" in name or "'norm'" in name:
            return np.ones(leaf.shape, np.float32).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape, dtype=np.float32) * scale).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, param_shapes(config, dtype))
