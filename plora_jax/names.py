"""Every list of names the project accepts, defined once. Configs validate against these, the
switches dispatch on them, the policy registry and the benchmarks iterate them; nothing else
spells them out. Plain tuples with no imports, so `config` can use them without pulling in jax.
"""

from __future__ import annotations

DTYPES = ("auto", "float32", "bfloat16")
ROPE_KINDS = ("default", "linear", "llama3", "freq_factors")
# Paged attention: `plora_jax.pallas.attention.ops` ("cpu" is the C++ FFI kernel).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cpu", "pallas_gpu", "pallas_tpu")
# Paged LoRA shrink/expand: `plora_jax.pallas.lora.ops`.
LORA_IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
# Adapter memory: "paged" (pages through a page table) | "contiguous" (slots padded to max rank).
LORA_LAYOUTS = ("paged", "contiguous")
# Adapter loads: "async" (loads overlap steps) | "sync" (a step waits for its adapter, as S-LoRA).
ADAPTER_LOADS = ("async", "sync")
# Adapter memory: "separate" (a pool beside the KV cache) | "unified" (pages paid in KV blocks, as S-LoRA).
ADAPTER_MEMORY = ("separate", "unified")
# Residency policies an `EngineConfig` can name (`plora_jax.policies.POLICIES` maps them to
# classes); the oracles need future arrivals, so they are set through `Engine.set_policy` only.
CONFIG_POLICIES = ("reactive", "lru", "lookahead", "histogram", "predictive", "slora", "slora_prefetch")
ORACLES = ("oracle", "causal_oracle")
POLICY_NAMES = (*CONFIG_POLICIES, *ORACLES)
# The replay's S-LoRA baseline: reactive with synchronous loads; then every policy.
BASELINE_POLICY = "reactive_sync"
REPLAY_POLICIES = (BASELINE_POLICY, *POLICY_NAMES)


def check_name(field: str, value: str, names: tuple[str, ...], hint: str = "") -> None:
    """Raise a ValueError naming `field` when `value` is not one of `names`."""
    if value not in names:
        raise ValueError(f"{field} must be one of {list(names)}, got {value!r}{hint}")
