"""PEFT LoRA adapters: read, validate, and lay out in pages (host side, numpy).

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` as written by
PEFT's `save_pretrained`. The tensors are the source of truth for which (layer, projection)
pairs an adapter touches and at what rank; the config gives the scaling: `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`, where `r` and `lora_alpha` are overridden per module
by `rank_pattern` / `alpha_pattern` (keys matched against the module name as PEFT does: the
key, or the key preceded by a dot, ends the name). The scaling is folded into B here, so the
device computes `x A^T B` with no per-module scale.

`layout_pages` turns an adapter into the page layout of `plora_jax.lora.device_pool`: for every
projection, A^T rows `[num_layers, num_pages, page_rows, in]` and B rows `[num_layers,
num_pages, page_rows, out]`, where `num_pages = ceil(max rank / page_rows)` and every row past
a module's own rank is zero (the kernels rely on those zero tails instead of rank masks).

Anything wrong raises `AdapterError` (a ValueError) naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig

# Projection name -> (where it lives, index into the layer's projections).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {m: ("self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp") for m in TARGET_MODULES}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
}


class AdapterError(ValueError):
    """A LoRA adapter that cannot be served; the message names the file and field."""


def parse_target_modules(spec: str) -> tuple[str, ...]:
    """ "all" or a comma-separated subset of TARGET_MODULES, in canonical order."""
    if spec.strip() == "all":
        return TARGET_MODULES
    names = {n.strip() for n in spec.split(",") if n.strip()}
    bad = sorted(names - set(TARGET_MODULES))
    if bad or not names:
        raise ValueError(f"lora_target_modules={spec!r}: use 'all' or a comma list of {list(TARGET_MODULES)}")
    return tuple(m for m in TARGET_MODULES if m in names)


def module_dims(config: ModelConfig, modules: tuple[str, ...] = TARGET_MODULES) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection in `modules` of `config`."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return {m: dims[m] for m in modules}


@dataclass
class LoraAdapter:
    """One adapter in host memory, per (layer, module): A [r, in] and B [out, r] * scaling."""

    name: str
    path: Path
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    num_layers: int
    config: dict = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        present = {m for _, m in self.weights}
        return [m for m in TARGET_MODULES if m in present]

    @property
    def rank(self) -> int:
        """The largest rank of any module (what sets the page count)."""
        return max(a.shape[0] for a, _ in self.weights.values())

    def live_elements(self) -> int:
        """Weight elements at their true rank (A and B of every module and layer)."""
        return sum(a.size + b.size for a, b in self.weights.values())


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        # PEFT's rule: the key (a regex) matches the end of the name, after a dot or at the start.
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter folder not found")
    if not config_file.is_file():
        raise AdapterError(f"{config_file}: missing (a PEFT adapter folder needs adapter_config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{config_file}: field peft_type={peft_type!r} is not supported (only LORA)")
    for flag, variant in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"{config_file}: field {flag}=true ({variant}) is not supported, only plain LoRA")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{config_file}: field fan_in_fan_out=true is not supported for Llama projections")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{config_file}: field bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise AdapterError(f"{config_file}: field modules_to_save={config['modules_to_save']!r} is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if t.split(".")[-1] not in TARGET_MODULES]
        if bad:
            raise AdapterError(
                f"{config_file}: field target_modules holds unsupported module(s) {bad}; "
                f"supported: {list(TARGET_MODULES)}"
            )
    for name in ("r", "lora_alpha"):
        value = config.get(name, 8)
        if not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{config_file}: field {name}={value!r} must be a positive number")
    return config


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter needs on the device, known from its config and tensor header alone."""

    rank: int  # the largest rank of any module (sets the page count)
    target_modules: tuple[str, ...]
    live_elements: int  # weight elements at their true rank (A and B of every module and layer)


def _weights_file(path: Path) -> Path:
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{path / 'adapter_model.bin'}: pickled weights are refused (they can run code); "
                "save the adapter with safetensors (PEFT's default)"
            )
        raise AdapterError(f"{weights_file}: missing")
    return weights_file


def _plan(
    weights_file: Path,
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    model_config: ModelConfig,
    max_rank: int,
    modules: tuple[str, ...],
) -> dict[tuple[int, str], tuple[str, str, int, float]]:
    """Validate tensor names and shapes: (layer, module) -> (A key, B key, rank, scaling)."""
    dims = module_dims(model_config)
    parts: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA A/B weight of a supported projection")
        layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in dims or _PARENT[module] != parent:
            raise AdapterError(
                f"{weights_file}: tensor {key!r} targets {parent}.{module}, not supported; "
                f"supported: {list(TARGET_MODULES)}"
            )
        if module not in modules:
            raise AdapterError(
                f"{weights_file}: tensor {key!r} targets {module}, which this engine's lora_target_modules "
                f"({','.join(modules)}) leaves out"
            )
        if layer >= model_config.num_layers:
            raise AdapterError(
                f"{weights_file}: tensor {key!r} is for layer {layer}, the model has {model_config.num_layers}"
            )
        parts.setdefault((layer, module), {})[which] = key
    if not parts:
        raise AdapterError(f"{weights_file}: holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    plan = {}
    for (layer, module), pair in sorted(parts.items()):
        where = f"{weights_file}: layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{'A' if 'A' in pair else 'B'} without its partner")
        a, b = shapes[pair["A"]], shapes[pair["B"]]
        d_in, d_out = dims[module]
        if len(a) != 2 or len(b) != 2 or a[1] != d_in or b[0] != d_out or a[0] != b[1]:
            raise AdapterError(
                f"{where}: shapes lora_A {list(a)} and lora_B {list(b)} do not fit the base model "
                f"(expected [r, {d_in}] and [{d_out}, r])"
            )
        rank = a[0]
        if rank > max_rank:
            raise AdapterError(f"{where}: rank r={rank} is above the configured max_lora_rank={max_rank}")
        full_name = f"model.layers.{layer}.{_PARENT[module]}.{module}"
        r = _pattern_value(rank_pattern, full_name, config.get("r", rank))
        if r != rank:
            raise AdapterError(
                f"{where}: weights have rank {rank} but adapter_config.json field "
                f"{'rank_pattern' if rank_pattern else 'r'} says {r}"
            )
        alpha = _pattern_value(alpha_pattern, full_name, config.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        plan[(layer, module)] = (pair["A"], pair["B"], rank, scaling)
    return plan


def inspect_adapter(
    path: str | Path, model_config: ModelConfig, max_rank: int, modules: tuple[str, ...] = TARGET_MODULES
) -> AdapterInfo:
    """Validate a PEFT adapter folder from its config and the safetensors header only (no weight
    is read: registering thousands of adapters stays cheap). NaN/Inf are found when it loads."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config = _read_config(path)
    weights_file = _weights_file(path)
    try:
        with safe_open(str(weights_file), framework="numpy") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_file}: cannot be read ({e})") from None
    plan = _plan(weights_file, config, shapes, model_config, max_rank, modules)
    dims = module_dims(model_config)
    return AdapterInfo(
        rank=max(rank for _, _, rank, _ in plan.values()),
        target_modules=tuple(m for m in TARGET_MODULES if any(module == m for _, module in plan)),
        live_elements=sum(rank * sum(dims[module]) for (_, module), (_, _, rank, _) in plan.items()),
    )


def load_adapter(
    name: str, path: str | Path, model_config: ModelConfig, max_rank: int, modules: tuple[str, ...] = TARGET_MODULES
) -> LoraAdapter:
    """Read and validate a PEFT adapter folder for `model_config` (projections limited to `modules`)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    config = _read_config(path)
    weights_file = _weights_file(path)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_file}: cannot be read ({e})") from None
    plan = _plan(weights_file, config, {k: t.shape for k, t in tensors.items()}, model_config, max_rank, modules)
    weights = {}
    for (layer, module), (key_a, key_b, _, scaling) in plan.items():
        a32, b32 = tensors[key_a].astype(np.float32, copy=False), tensors[key_b].astype(np.float32, copy=False)
        if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
            raise AdapterError(f"{weights_file}: layer {layer} {module}: weights hold NaN or Inf")
        weights[(layer, module)] = (a32, b32 * np.float32(scaling))
    return LoraAdapter(name, path, weights, model_config.num_layers, config)


def layout_pages(
    adapter: LoraAdapter, model_config: ModelConfig, page_rows: int, dtype, modules: tuple[str, ...] = TARGET_MODULES
) -> tuple[dict, dict, int]:
    """(a_pages, b_pages, num_pages): per module, [num_layers, num_pages, page_rows, width] arrays.

    Every module of the pool gets pages (zeros where the adapter leaves a module or layer out),
    so one page list serves all projections of the adapter.
    """
    num_pages = math.ceil(adapter.rank / page_rows)
    rows = num_pages * page_rows
    layers = model_config.num_layers
    a_pages, b_pages = {}, {}
    for module, (d_in, d_out) in module_dims(model_config, modules).items():
        a_full = aligned_zeros((layers, rows, d_in), dtype)
        b_full = aligned_zeros((layers, rows, d_out), dtype)
        for layer in range(layers):
            pair = adapter.weights.get((layer, module))
            if pair is not None:
                a, b = pair
                a_full[layer, : a.shape[0]] = a
                b_full[layer, : b.shape[1]] = b.T
        a_pages[module] = a_full.reshape(layers, num_pages, page_rows, d_in)
        b_pages[module] = b_full.reshape(layers, num_pages, page_rows, d_out)
    return a_pages, b_pages, num_pages


def aligned_zeros(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """Zeros whose data starts on an `align`-byte boundary: on the CPU backend `device_put`
    then shares the buffer instead of copying it (host copies are never written again)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.zeros(nbytes + align, np.uint8)
    offset = -buffer.ctypes.data % align
    return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def save_random_adapter(
    path: str | Path,
    config: ModelConfig,
    rank: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    alpha: float | None = None,
    scale: float = 0.1,
    dtype=np.float32,
    **extra_config,
) -> Path:
    """Write a PEFT-format LoRA folder with random (non-zero) A and B: tests and benchmarks."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    dims = module_dims(config, tuple(targets))
    tensors = {}
    for layer in range(config.num_layers):
        for module, (d_in, d_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) * scale).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * scale).astype(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        **extra_config,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return path
