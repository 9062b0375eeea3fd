"""Frozen, hashable configuration dataclasses.

Configs are plain values: they can be passed to `jax.jit` as static arguments, compared, hashed
and written to JSON (the parameter cache stores the `ModelConfig` next to the weights). The CLI
flags of the command-line tools are generated from these dataclasses (see `plora_jax.cli`), so a
field added here becomes a flag without further wiring.

Presets are functions (`tiny()`, `smollm2_135m()`, `llama3_8b()`) derived with
`dataclasses.replace` where a variant is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .names import (
    ADAPTER_LOADS,
    ADAPTER_MEMORY,
    ATTENTION_IMPLEMENTATIONS,
    CONFIG_POLICIES,
    DTYPES,
    LORA_IMPLEMENTATIONS,
    LORA_LAYOUTS,
    ROPE_KINDS,
    check_name,
)
from .policies.retention import RETENTION_INTERVALS


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency plus the scaling found in Llama configs.

    kinds: `default` (plain RoPE), `linear` (positions divided by `factor`), `llama3` (the
    wavelength-dependent scaling of Llama 3.1+ configs) and `freq_factors` (GGUF's
    `rope_freqs.weight` tensor: one divisor per frequency, what llama.cpp stores for Llama 3).
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope_scaling.rope_type={self.kind!r} is not supported (supported: {ROPE_KINDS})")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2] (float32), scaling applied."""
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        inv = 1.0 / (self.theta**exponents)
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            # Long wavelengths are slowed by `factor`, short ones kept, and the band between is
            # interpolated smoothly (Llama 3.1 "rope_type": "llama3").
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
            inv = np.where(mid, (1 - smooth) * inv / self.factor + smooth * inv, scaled)
        elif self.kind == "freq_factors":
            if len(self.freq_factors) != head_dim // 2:
                raise ValueError(
                    f"rope freq_factors has {len(self.freq_factors)} entries, expected head_dim/2={head_dim // 2}"
                )
            inv = inv / np.asarray(self.freq_factors, dtype=np.float64)
        return inv.astype(np.float32)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    architecture: str = "llama"
    name: str = "llama"

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model config field {f} must be > 0, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_params(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def kv_block_bytes(self, block_size: int, itemsize: int) -> int:
        """Device bytes of one KV block of `block_size` tokens: K and V in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * block_size * itemsize

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        rope = data.pop("rope")
        rope["freq_factors"] = tuple(rope.get("freq_factors", ()))
        return cls(rope=RopeConfig(**rope), **data)


def tiny(**overrides: Any) -> ModelConfig:
    """A 2-layer random model for tests where the model is not the point."""
    cfg = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        name="tiny",
    )
    return dataclasses.replace(cfg, **overrides)


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M-Instruct, the default model (shapes as in its GGUF metadata)."""
    return ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=100000.0),
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        name="smollm2-135m",
    )


def llama3_8b() -> ModelConfig:
    """Llama-3.1-8B shapes: for benchmarks with random weights at real size."""
    return ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, original_max_position=8192),
        max_position_embeddings=131072,
        name="llama3-8b",
    )


@dataclass(frozen=True)
class EngineConfig:
    """How an `Engine` runs a model. Every field is also a CLI flag (see `plora_jax.cli`).

    Sizes here are capacities (`max_*`) or bucket bounds; what changes per request is data.
    """

    model: str = "llama"  # "llama" (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face folder
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on accelerators) | "float32" | "bfloat16"
    max_model_len: int = 4096  # capped by the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int = 1024  # KV blocks in the device cache, block 0 reserved
    max_num_seqs: int = 16  # rows of the decode batch
    max_num_batched_tokens: int = 512  # tokens per prefill step; longer prompts are chunked
    max_prefill_seqs: int = 4  # prompts prefilled together in one step
    min_prefill_bucket: int = 16  # smallest padded prompt chunk
    warmup: bool = True  # build every executable at start (serving begins once the smallest set is ready)
    compilation_cache: bool = True  # executables cached under <cache>/executables: restarts compile nothing
    compile_cache: str = ""  # a folder or store prefix every node shares: executables and parameters a fresh node pulls
    compile_cache_key: str = (
        ""  # a file holding the nodes' secret: entries are signed, and code is pulled only if signed
    )
    attention_implementation: str = "auto"  # "auto" | "xla" | "cpu" (C++ kernel) | "pallas_gpu" | "pallas_tpu"
    seed: int = 0  # seeds requests that bring no seed of their own
    cache_dir: str | None = None  # None: $PLORA_CACHE or ~/.cache/plora
    param_cache: bool = True  # cache converted parameters with orbax
    # Multi-LoRA (0 max_loras: no adapter pool, no LoRA code in the compiled steps).
    max_loras: int = 8  # adapters resident on the device at once (adapter slots)
    max_lora_rank: int = 128  # adapters of higher rank are refused
    page_rows: int = 8  # rank rows per adapter page
    lora_pool_pages: int = 0  # pages in the adapter pool (0: size it from lora_pool_mb)
    lora_pool_mb: float = 256.0  # device memory for adapter pages when lora_pool_pages is 0
    lora_target_modules: str = "all"  # projections with adapter pages: "all" or e.g. "q_proj,v_proj"
    layout: str = "paged"  # "paged" (pages through a page table) | "contiguous" (slots padded to max rank)
    lora_implementation: str = "auto"  # "auto" | "xla" | "pallas_gpu" | "pallas_tpu"
    # Tiers and prefetch.
    host_cache_mb: float = 4096.0  # host memory for page-laid-out adapter copies (0: read from disk each load)
    node_cache_dir: str | None = None  # adapters fetched from object storage, node-wide (None: <cache>/adapters)
    node_cache_mb: float = 20480.0  # disk for the node cache (least recently used out past it)
    adapter_source_options: str = ""  # fsspec options per protocol, JSON: {"s3": {"endpoint_url": "..."}}
    policy: str = "predictive"  # reactive | lru | lookahead | histogram | predictive (oracle: set_policy)
    policy_interval_s: float = 60.0  # seconds between policy decisions and forecaster runs
    max_prefetch_inflight: int = 2  # device prefetches queued on the transfer thread at once
    adapter_loads: str = "async"  # "async": loads overlap steps | "sync": a step waits for its missing adapter (S-LoRA)
    # "separate": the adapter pool is memory of its own, beside the KV cache (vLLM) | "unified":
    # one budget, the KV blocks: an adapter's pages take the blocks they are worth (S-LoRA).
    adapter_memory: str = "separate"
    # async: a demand load copied from the host cache is waited for at admission (one copy to the
    # device, never a read from disk), so its request joins the step being planned, not the next.
    wait_host_copies: bool = True
    predictor_checkpoint: str = ""  # predictive's forecaster: "" shipped LSTM, a checkpoint folder, or "ewma"
    # predictive's eviction also values adapters its gap history expects back within this many
    # intervals (0, the default: the one-interval forecast alone; plora_jax/policies/retention.py)
    retention_intervals: float = RETENTION_INTERVALS
    # Liveness: a hung device step or transfer (a first-use compile counts too).
    step_timeout_s: float = 120.0  # readiness (/health) says "stalled" (503) when one loop iteration runs longer

    def __post_init__(self):
        check_name("dtype", self.dtype, DTYPES)
        fields = (
            "max_model_len",
            "block_size",
            "num_kv_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_prefill_seqs",
            "min_prefill_bucket",
        )
        for f in fields:
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")
        check_name("layout", self.layout, LORA_LAYOUTS)
        check_name("attention_implementation", self.attention_implementation, ATTENTION_IMPLEMENTATIONS)
        check_name("lora_implementation", self.lora_implementation, LORA_IMPLEMENTATIONS)
        for f in ("max_lora_rank", "page_rows"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")
        if self.max_loras < 0 or self.lora_pool_pages < 0 or self.lora_pool_mb <= 0:
            raise ValueError("max_loras and lora_pool_pages must be >= 0 and lora_pool_mb > 0")
        hint = " (the oracle needs future arrivals: Engine.set_policy(Oracle(...)))" if self.policy == "oracle" else ""
        check_name("policy", self.policy, CONFIG_POLICIES, hint)
        if self.policy_interval_s <= 0 or self.host_cache_mb < 0 or self.max_prefetch_inflight < 1:
            raise ValueError("policy_interval_s must be > 0, host_cache_mb >= 0 and max_prefetch_inflight >= 1")
        check_name("adapter_loads", self.adapter_loads, ADAPTER_LOADS)
        check_name("adapter_memory", self.adapter_memory, ADAPTER_MEMORY)
        if self.retention_intervals < 0:
            raise ValueError(f"retention_intervals must be >= 0, got {self.retention_intervals}")
        if self.node_cache_mb <= 0:
            raise ValueError(f"node_cache_mb must be > 0, got {self.node_cache_mb}")
        self.source_options()  # valid JSON of the right shape
        if not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (block 0 is reserved), got {self.num_kv_blocks}")

    def source_options(self) -> dict[str, dict]:
        """`adapter_source_options` parsed: fsspec options per protocol."""
        if not self.adapter_source_options:
            return {}
        try:
            options = json.loads(self.adapter_source_options)
        except ValueError as e:
            raise ValueError(f"adapter_source_options is not JSON ({e})") from None
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError("adapter_source_options must be a JSON object of {protocol: {option: value}}")
        return options
