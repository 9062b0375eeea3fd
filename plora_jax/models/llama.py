"""Flax (linen) Llama: RMSNorm, RoPE (with Llama-3 scaling), grouped-query attention, SwiGLU.

One forward serves every phase. Each step's tokens are laid out `[batch, tokens]` with an
`AttentionMetadata`: a token first writes its K/V into the paged cache at its `slot_mapping`,
then every query attends over its row's blocks (gathered through `block_tables`), masked to
positions `<= its own` and `< context_lens`. Prefill, chunked prefill and decode differ only in
the shapes of that layout, so the engine needs no separate attention code path per phase.

The decoder layers run under `nn.scan` over parameters stacked on a leading `num_layers` axis,
so compile time does not grow with depth. The KV cache travels in the scan carry (the whole
`[num_layers, ...]` array, updated at the layer index) rather than as a scanned input: XLA then
updates the donated buffer in place instead of re-stacking per-layer slices.

LoRA: with a `LoraBatch` (the paged adapter pool and each row's `adapter_slot`), every
projection adds its row's adapter delta through `plora_jax.pallas.lora_ops` (see `_proj`).
Without one, the forward has no LoRA code at all.

Precision: matmuls run in the parameter dtype (float32 or bfloat16); RMSNorm statistics, RoPE
and softmax run in float32, and logits are returned in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..lora_pool import LoraBatch
from ..pallas.lora_ops import lora_delta_apply
from ..state import AttentionMetadata, KVCache

# A large finite negative instead of -inf: a fully masked padding row then softmaxes to a
# uniform (finite) distribution instead of NaN.
_MASK_VALUE = -1e30


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(self.dtype)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [batch, tokens, head_dim // 2] (float32) for integer positions [batch, tokens]."""
    inv_freq = jnp.asarray(config.rope.inv_freq(config.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [batch, tokens, heads, head_dim] in the half-split layout (HF's rotate_half)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dense(features: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype, name=name)


def _proj(features: int, dtype, name: str, x, lora: LoraBatch | None, layer, implementation: str):
    """x @ W for a projection, plus each row's LoRA delta through the paged adapter pool.

    The pool holds all layers; it is viewed as one `[layers * pages, ...]` pool and this layer's
    page ids are offset by `layer * pages`, so no per-layer slice of the pool is ever copied.
    """
    base = _dense(features, dtype, name)(x)
    if lora is None or name not in lora.pool.a:
        return base
    pool = lora.pool
    a, b = pool.a[name], pool.b[name]
    layers, pages = a.shape[:2]
    table = pool.page_table + layer * pages
    flat_a = a.reshape(layers * pages, *a.shape[2:])
    flat_b = b.reshape(layers * pages, *b.shape[2:])
    return lora_delta_apply(x, base, lora.row_slot, flat_a, flat_b, table, pool.num_pages, implementation)


def paged_attention(
    q: jax.Array,  # [batch, tokens, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim] (one layer)
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    sliding_window: int | None,
) -> jax.Array:  # [batch, tokens, num_heads, head_dim]
    """Reference (XLA) paged attention: gather each row's blocks, then masked softmax."""
    batch, tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = k_cache[meta.block_tables].reshape(batch, -1, num_kv_heads, head_dim)
    values = v_cache[meta.block_tables].reshape(batch, -1, num_kv_heads, head_dim)
    qg = q.reshape(batch, tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys).astype(jnp.float32) * (head_dim**-0.5)
    key_pos = jnp.arange(keys.shape[1])[None, None, :]  # [1, 1, seq]
    query_pos = meta.positions[:, :, None]  # [batch, tokens, 1]
    visible = (key_pos <= query_pos) & (key_pos < meta.context_lens[:, None, None])
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    scores = jnp.where(visible[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values)
    return out.reshape(batch, tokens, num_heads, head_dim)


class Attention(nn.Module):
    config: ModelConfig
    dtype: Any
    lora_implementation: str = "auto"

    @nn.compact
    def __call__(self, x, kv: KVCache, layer, meta: AttentionMetadata, cos, sin, lora=None):
        cfg = self.config
        batch, tokens, _ = x.shape
        proj = functools.partial(_proj, lora=lora, layer=layer, implementation=self.lora_implementation)
        q = proj(cfg.num_heads * cfg.head_dim, self.dtype, "q_proj", x)
        k = proj(cfg.num_kv_heads * cfg.head_dim, self.dtype, "k_proj", x)
        v = proj(cfg.num_kv_heads * cfg.head_dim, self.dtype, "v_proj", x)
        q = apply_rope(q.reshape(batch, tokens, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(batch, tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(batch, tokens, cfg.num_kv_heads, cfg.head_dim)

        # Write this step's K/V first, so that one read path covers cached and new tokens.
        # Index the 5-D cache as (layer, block, offset): reshaping the carried buffer to a flat
        # slot axis makes XLA:CPU copy the whole cache for a one-token write (10 s per decode
        # step at 1024 blocks, measured), while this form updates it in place.
        slots = meta.slot_mapping.reshape(-1)
        blocks, offsets = slots // kv.block_size, slots % kv.block_size
        new_k = kv.k.at[layer, blocks, offsets].set(k.reshape(-1, *k.shape[2:]).astype(kv.k.dtype))
        new_v = kv.v.at[layer, blocks, offsets].set(v.reshape(-1, *v.shape[2:]).astype(kv.v.dtype))
        kv = KVCache(k=new_k, v=new_v)

        out = paged_attention(q, kv.k[layer], kv.v[layer], meta, cfg.sliding_window)
        out = proj(cfg.hidden_size, self.dtype, "o_proj", out.reshape(batch, tokens, -1).astype(self.dtype))
        return out, kv


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any
    lora_implementation: str = "auto"

    @nn.compact
    def __call__(self, x, layer, lora=None):
        cfg = self.config
        proj = functools.partial(_proj, lora=lora, layer=layer, implementation=self.lora_implementation)
        gate = proj(cfg.intermediate_size, self.dtype, "gate_proj", x)
        up = proj(cfg.intermediate_size, self.dtype, "up_proj", x)
        return proj(cfg.hidden_size, self.dtype, "down_proj", nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Any
    lora_implementation: str = "auto"

    @nn.compact
    def __call__(self, carry, layer, meta: AttentionMetadata, cos, sin, lora):
        x, kv = carry
        cfg = self.config
        impl = self.lora_implementation
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        attn_out, kv = Attention(cfg, self.dtype, impl, name="self_attn")(h, kv, layer, meta, cos, sin, lora)
        x = x + attn_out
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, self.dtype, impl, name="mlp")(h, layer, lora)
        return (x, kv), None


class Llama(nn.Module):
    """Decoder-only Llama. `__call__` returns (logits float32, updated KV cache).

    `logits_indices` [batch] selects one token per row (the last prompt token in prefill, the
    only token in decode) so the vocabulary projection, this model's largest matmul, runs on
    `batch` rows instead of `batch * tokens`. Without it, logits of every token are returned.
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    lora_implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [batch, tokens] i32
        kv: KVCache,
        meta: AttentionMetadata,
        logits_indices: jax.Array | None = None,  # [batch] i32
        lora: LoraBatch | None = None,
    ):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="embed_tokens")
        x = embed(tokens)
        cos, sin = rope_tables(cfg, meta.positions)
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.dtype, self.lora_implementation, name="layers")
        (x, kv), _ = layers((x, kv), jnp.arange(cfg.num_layers), meta, cos, sin, lora)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        if logits_indices is not None:
            x = jnp.take_along_axis(x, logits_indices[:, None, None], axis=1)[:, 0]
        head = embed.attend if cfg.tie_word_embeddings else _dense(cfg.vocab_size, self.dtype, "lm_head")
        logits = head(x)
        return logits.astype(jnp.float32), kv


def param_shapes(config: ModelConfig, dtype) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating (used to validate loaders)."""
    model = Llama(config, dtype)
    kv = jax.ShapeDtypeStruct((config.num_layers, 2, 1, config.num_kv_heads, config.head_dim), dtype)
    meta = AttentionMetadata(
        positions=jax.ShapeDtypeStruct((1, 1), jnp.int32),
        slot_mapping=jax.ShapeDtypeStruct((1, 1), jnp.int32),
        block_tables=jax.ShapeDtypeStruct((1, 1), jnp.int32),
        context_lens=jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(
        lambda t, k, v, m: model.init(jax.random.PRNGKey(0), t, KVCache(k, v), m), tokens, kv, kv, meta
    )
    return variables["params"]


def init_params(config: ModelConfig, dtype, seed: int = 0, scale: float = 0.02) -> dict:
    """Random parameters (normal * scale, norms at 1) in numpy: tiny test models and benchmarks."""
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        if "layernorm" in name or "'norm'" in name:
            return np.ones(leaf.shape, np.float32).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape, dtype=np.float32) * scale).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, param_shapes(config, dtype))
