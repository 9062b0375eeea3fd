"""Device state and step inputs: registered dataclass pytrees, and only device data.

Words used everywhere in the project:

- `seq_slot`: a row of the decode batch.
- `block_id`: a block of the paged KV cache; block 0 is reserved (padding tokens write there
  and padded block-table entries point there; it is never handed to a sequence).
- `slot_mapping`: the flat KV position `block_id * block_size + offset` a token writes to.
- `segment`: one request's chunk inside a packed prefill step.
- `num_*`, `max_*`, `padded_*`: a count, a capacity, a size rounded up to a bucket.

Host bookkeeping (free lists, refcounts, request state) lives in plain Python/numpy classes
elsewhere; nothing here is mutated in place. Every array field carries its shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Paged key/value cache shared by all sequences: one array per layer, so each layer's
    attention reads and writes its own buffer in place (slices of a stacked cache make XLA:CPU
    copy). Layout of each array: see `plora_jax.pallas.attention.reference`."""

    k: tuple  # num_layers x [num_kv_heads, num_blocks, block_size, head_dim] (last two swapped: k_transposed)
    v: tuple  # num_layers x [num_kv_heads, num_blocks, block_size, head_dim]

    @property
    def num_blocks(self) -> int:
        return self.v[0].shape[1]

    @property
    def block_size(self) -> int:
        return self.v[0].shape[2]

    @classmethod
    def zeros(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype, k_transposed: bool = False):
        v_shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
        k_shape = (config.num_kv_heads, num_blocks, config.head_dim, block_size) if k_transposed else v_shape
        layers = range(config.num_layers)
        return cls(
            k=tuple(device_zeros(k_shape, dtype) for _ in layers), v=tuple(device_zeros(v_shape, dtype) for _ in layers)
        )


def device_zeros(shape, dtype) -> jax.Array:
    """A zero array on the default device, without compiling anything (`jnp.zeros` compiles a
    small executable per shape: a restart would pay for each)."""
    return jax.device_put(np.zeros(shape, jnp.dtype(dtype)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeMetadata:
    """A decode step: one token per row. Padding rows have `context_lens == 0` and write to
    slot 0 (inside reserved block 0)."""

    positions: jax.Array  # [padded_rows] i32, position of each row's token
    slot_mapping: jax.Array  # [padded_rows] i32, flat KV slot the token writes
    block_tables: jax.Array  # [padded_rows, max_blocks] i32, every row's blocks at full width, 0-padded
    context_lens: jax.Array  # [padded_rows] i32, tokens readable after this step's write (position + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillMetadata:
    """A packed prefill step: the chunks of up to `max_segments` requests laid end to end in
    one row of tokens. Only segment 0 may continue a prompt (have `seq_starts > 0`): the
    scheduler packs several requests only with first chunks after it. Padding tokens have
    segment -1 and write to slot 0."""

    positions: jax.Array  # [padded_tokens] i32, position of each token in its sequence
    slot_mapping: jax.Array  # [padded_tokens] i32, flat KV slot each token writes
    segment_ids: jax.Array  # [padded_tokens] i32, segment of each token (-1: padding)
    block_tables: jax.Array  # [max_segments, max_blocks] i32, each segment's blocks, 0-padded
    seq_starts: jax.Array  # [max_segments] i32, tokens of each segment already in the cache
    logits_indices: jax.Array  # [max_segments] i32, index of each segment's last token (0 for padding)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    """Everything the engine's jitted functions update, each piece donated to its updater."""

    kv: KVCache  # donated to every decode and prefill step
    # Newest sampled token of each seq_slot: the next decode reads its input here, so the host
    # never waits for a token before dispatching the step that consumes it.
    last_tokens: jax.Array  # [max_num_seqs] i32, donated to every step (padding rows' writes are dropped)
    penalties: Any = None  # sampling.PenaltyTables ([max_num_seqs, vocab] each), donated to every step
    lora: Any = None  # LoraPool (donated to adapter commits; read by steps), None without LoRA
