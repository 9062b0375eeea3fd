"""Device state: registered dataclass pytrees, and only device state.

Words used everywhere in the project:

- `seq_slot`: a row of the decode batch.
- `block_id`: a row of the paged KV cache; block 0 is reserved (padding writes land there and
  padded block-table entries point there; it is never handed to a sequence).
- `slot_mapping`: the flat KV position `block_id * block_size + offset` a token writes to.
- `num_*`, `max_*`, `padded_*`: a count, a capacity, a size rounded up to a bucket.

Host bookkeeping (free lists, refcounts, request state) lives in plain Python/numpy classes
elsewhere; nothing here is mutated in place. Every array field carries its shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Paged key/value cache shared by all sequences."""

    k: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype) -> KVCache:
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a step sits and which KV blocks each row may read.

    The same layout serves prefill (T tokens of one prompt chunk per row), chunked prefill (a
    chunk whose positions start after earlier chunks) and decode (T = 1). Padding tokens write
    to slot 0 (inside reserved block 0) and their outputs are ignored; padding rows have
    `context_lens == 0`.
    """

    positions: jax.Array  # [batch, tokens] i32, position of each token in its sequence
    slot_mapping: jax.Array  # [batch, tokens] i32, flat KV slot written by each token
    block_tables: jax.Array  # [batch, padded_blocks_per_seq] i32, KV blocks of each row, 0-padded
    context_lens: jax.Array  # [batch] i32, tokens of the sequence readable after this step's writes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    """Everything the engine's jitted functions update, each piece donated to its updater."""

    kv: KVCache  # donated to every decode and prefill step
    # Newest sampled token of each seq_slot: the next decode reads its input here, so the host
    # never waits for a token before dispatching the step that consumes it.
    last_tokens: jax.Array  # [max_num_seqs] i32, donated to the sampler
    lora: Any = None  # LoraPool (donated to adapter commits; read by steps), None without LoRA
