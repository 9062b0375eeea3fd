"""PEFT LoRA adapters: read, validate, and lay out in pages (host side, numpy).

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` as written by
PEFT's `save_pretrained` (read through `adapter_files`: confined, opened once, planned keys
only). The tensors are the source of truth for which (layer, projection) pairs an adapter
touches and at what rank; the config gives the scaling: `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`, where `r` and `lora_alpha` are overridden per module
by `rank_pattern` / `alpha_pattern`. The scaling is folded into B here, so the device computes
`x A^T B` with no per-module scale.

The config is untrusted input, checked as a schema (`check_config`): every field the reader
uses has its type and range (finite, positive alphas up to `limits.MAX_LORA_ALPHA`). PEFT's
pattern keys are regular expressions; no regex from a file is ever compiled here (a
backtracking one takes hours). A key is a module-path suffix: letters, digits, `_` and dots
(`\\.` is read as a dot), optionally anchored with `^` (the whole name) and ending in `$`; it
matches a module when it ends the name after a dot, as PEFT's rule does for such keys. Any
other key is refused by name. The weights are checked after scaling: every element of A and of
scaling x B finite and at most `limits.MAX_LORA_WEIGHT` in magnitude.

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
from ..limits import MAX_LORA_ALPHA, MAX_LORA_WEIGHT, MAX_NAME_CHARS, MAX_PATTERN_CHARS, MAX_PATTERNS, MAX_RANK
from .adapter_files import (  # noqa: F401 (AdapterRemoved: re-exported)
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterFolder,
    AdapterRemoved,
    FolderIdentity,
    shown,
)

# Projection name -> (where it lives, index into the layer's projections).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {m: ("self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp") for m in TARGET_MODULES}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d{1,6})\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
}


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


_PATTERN_KEY = re.compile(r"\^?((?:[A-Za-z0-9_]|\\?\.)+)\$?")  # what a pattern key may be (see the docstring)


def _pattern_suffix(key: str, where: str, field_name: str) -> tuple[str, bool]:
    """(the module-path suffix a pattern key names, anchored at the start); AdapterError for a
    key that is not a literal suffix."""
    match = _PATTERN_KEY.fullmatch(key) if isinstance(key, str) and len(key) <= MAX_PATTERN_CHARS else None
    if match is None:
        raise AdapterError(
            f"{where}: field {field_name} key {str(key)[:80]!r} is not supported: keys must be module-path "
            f"suffixes (letters, digits, '_', '.'; optionally '^...$'), at most {MAX_PATTERN_CHARS} characters"
        )
    return match[1].replace("\\.", "."), key.startswith("^")


def _pattern_value(patterns: dict[tuple[str, bool], float], module_name: str, default):
    """The value of the first key that matches `module_name` (PEFT's order: the config's)."""
    for (suffix, anchored), value in patterns.items():
        if module_name == suffix or (not anchored and module_name.endswith("." + suffix)):
            return value
    return default


def _finite_positive(value, bound: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):  # compared exactly: float(10**400) would overflow
        return 0 < value <= bound
    return math.isfinite(value) and 0 < value <= bound


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK


def _flag(config: dict, name: str, where: str) -> bool:
    value = config.get(name)
    if value is not None and not isinstance(value, bool):
        raise AdapterError(f"{where}: field {name}={shown(value)} must be true or false")
    return bool(value)


def _patterns(config: dict, name: str, where: str, valid, what: str) -> dict[tuple[str, bool], float]:
    raw = config.get(name) or {}
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: field {name} must be an object mapping module names to values")
    if len(raw) > MAX_PATTERNS:
        raise AdapterError(f"{where}: field {name} has {len(raw)} entries, more than {MAX_PATTERNS}")
    out = {}
    for key, value in raw.items():
        suffix = _pattern_suffix(key, where, name)
        if not valid(value):
            raise AdapterError(f"{where}: field {name}[{shown(key)}]={shown(value)} must be {what}")
        out.setdefault(suffix, value)
    return out


def check_config(config, where: str) -> dict:
    """`adapter_config.json`'s content checked as a schema: the fields this reader uses, with
    their types and ranges (AdapterError naming the field). Returns the config with
    `rank_pattern` / `alpha_pattern` replaced by their parsed keys."""
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterError(f"{where}: field peft_type={shown(peft_type)} is not supported (only LORA)")
    for flag, variant in _UNSUPPORTED_FLAGS.items():
        if _flag(config, flag, where):
            raise AdapterError(f"{where}: field {flag}=true ({variant}) is not supported, only plain LoRA")
    if _flag(config, "fan_in_fan_out", where):
        raise AdapterError(f"{where}: field fan_in_fan_out=true is not supported for Llama projections")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{where}: field bias={shown(config['bias'])} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise AdapterError(f"{where}: field modules_to_save={shown(config['modules_to_save'])} is not supported")
    _check_targets(config.get("target_modules"), where)
    if "r" in config and not _positive_int(config["r"]):
        raise AdapterError(f"{where}: field r={shown(config['r'])} must be a positive integer")
    if "lora_alpha" in config and not _finite_positive(config["lora_alpha"], MAX_LORA_ALPHA):
        alpha = config["lora_alpha"]
        raise AdapterError(f"{where}: field lora_alpha={shown(alpha)} must be a number in (0, {MAX_LORA_ALPHA}]")
    _flag(config, "use_rslora", where)
    alpha_ok = lambda v: _finite_positive(v, MAX_LORA_ALPHA)
    return {
        **config,
        "rank_pattern": _patterns(config, "rank_pattern", where, _positive_int, "a positive integer"),
        "alpha_pattern": _patterns(config, "alpha_pattern", where, alpha_ok, f"a number in (0, {MAX_LORA_ALPHA}]"),
    }


def _check_targets(targets, where: str) -> None:
    if targets is None:
        return
    names = [targets] if isinstance(targets, str) else targets
    if not isinstance(names, list) or not all(isinstance(t, str) and len(t) <= MAX_NAME_CHARS for t in names):
        raise AdapterError(f"{where}: field target_modules must be a string or a list of module names")
    bad = [t for t in names if t.split(".")[-1] not in TARGET_MODULES] if isinstance(targets, list) else []
    if bad:
        raise AdapterError(
            f"{where}: field target_modules holds unsupported module(s) {bad[:8]}; supported: {list(TARGET_MODULES)}"
        )


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter needs on the device, known from its config and tensor header alone."""

    rank: int  # the largest rank of any module (sets the page count)
    target_modules: tuple[str, ...]
    live_elements: int  # weight elements at their true rank (A and B of every module and layer)
    identity: FolderIdentity | None = None  # the files it was read from (a later read must find them)


def _plan(
    weights_file: str,
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    model_config: ModelConfig,
    max_rank: int,
    modules: tuple[str, ...],
) -> dict[tuple[int, str], tuple[str, str, int, float]]:
    """Validate tensor names and shapes: (layer, module) -> (A key, B key, rank, scaling).
    `config` is `check_config`'s."""
    dims = module_dims(model_config)
    parts: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{weights_file}: tensor {shown(key)} is not a LoRA A/B weight of a supported projection"
            )
        layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in dims or _PARENT[module] != parent:
            raise AdapterError(
                f"{weights_file}: tensor {shown(key)} targets {parent}.{module}, not supported; "
                f"supported: {list(TARGET_MODULES)}"
            )
        if module not in modules:
            raise AdapterError(
                f"{weights_file}: tensor {shown(key)} targets {module}, which this engine's lora_target_modules "
                f"({','.join(modules)}) leaves out"
            )
        if layer >= model_config.num_layers:
            raise AdapterError(
                f"{weights_file}: tensor {shown(key)} is for layer {layer}, the model has {model_config.num_layers}"
            )
        parts.setdefault((layer, module), {})[which] = key
    if not parts:
        raise AdapterError(f"{weights_file}: holds no LoRA weights")

    rank_pattern, alpha_pattern = config["rank_pattern"], config["alpha_pattern"]
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
        if not 0 < scaling < math.inf:
            raise AdapterError(f"{where}: its scaling lora_alpha / r = {alpha} / {r} is not a finite positive number")
        plan[(layer, module)] = (pair["A"], pair["B"], rank, scaling)
    return plan


def read_adapter(
    name: str,
    path: str | Path,
    model_config: ModelConfig,
    max_rank: int,
    modules: tuple[str, ...] = TARGET_MODULES,
    expect: FolderIdentity | None = None,
    weights: bool = True,
) -> tuple[AdapterInfo, LoraAdapter | None]:
    """Validate a PEFT adapter folder for `model_config` (projections limited to `modules`) from
    one opening of its files: its `AdapterInfo` from the config and tensor header, and with
    `weights` the adapter itself (only the planned tensors are read, then checked).
    `expect`: the identity a registration recorded (a changed folder is refused). Whatever is
    wrong with the files is an `AdapterError`, never another exception."""
    try:
        return _read_adapter(name, Path(path), model_config, max_rank, modules, expect, weights)
    except AdapterError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:  # a file no check foresaw
        raise AdapterError(f"{Path(path).name}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def _read_adapter(name: str, path: Path, model_config, max_rank: int, modules, expect, weights: bool):
    with AdapterFolder(path) as folder:
        where = f"{folder.label}/{WEIGHTS_FILE}"
        config = check_config(folder.config, f"{folder.label}/{CONFIG_FILE}")
        folder.open_weights(expect)
        plan = _plan(where, config, {k: t.shape for k, t in folder.tensors.items()}, model_config, max_rank, modules)
        dims = module_dims(model_config)
        info = AdapterInfo(
            rank=max(rank for _, _, rank, _ in plan.values()),
            target_modules=tuple(m for m in TARGET_MODULES if any(module == m for _, module in plan)),
            live_elements=sum(rank * sum(dims[module]) for (_, module), (_, _, rank, _) in plan.items()),
            identity=folder.identity,
        )
        if not weights:
            return info, None
        tensors = {}
        for (layer, module), (key_a, key_b, _, scaling) in plan.items():
            a32 = folder.read(key_a).astype(np.float32)
            with np.errstate(over="ignore"):  # an overflow is found (as Inf) by the check below
                b32 = folder.read(key_b).astype(np.float32) * np.float32(scaling)
            _check_weights(f"{where}: layer {layer} {module}", a32, b32)
            tensors[(layer, module)] = (a32, b32)
    return info, LoraAdapter(name, path, tensors, model_config.num_layers, config)


def inspect_adapter(
    path: str | Path, model_config: ModelConfig, max_rank: int, modules: tuple[str, ...] = TARGET_MODULES
) -> AdapterInfo:
    """Validate a PEFT adapter folder from its config and the safetensors header only (no weight
    is read: registering thousands of adapters stays cheap). Bad weights are found when it loads."""
    return read_adapter("", path, model_config, max_rank, modules, weights=False)[0]


def load_adapter(
    name: str,
    path: str | Path,
    model_config: ModelConfig,
    max_rank: int,
    modules: tuple[str, ...] = TARGET_MODULES,
    expect: FolderIdentity | None = None,
) -> LoraAdapter:
    """Read and validate a PEFT adapter folder (`read_adapter` with its weights)."""
    return read_adapter(name, path, model_config, max_rank, modules, expect)[1]


def _check_weights(where: str, a: np.ndarray, scaled_b: np.ndarray) -> None:
    """A and scaling x B finite and bounded: one adapter cannot put Inf or NaN (or values that
    overflow a matmul into them) on the device."""
    for label, w in (("lora_A", a), ("lora_B x scaling", scaled_b)):
        if not np.isfinite(w).all():
            raise AdapterError(f"{where}: {label} holds NaN or Inf")
        peak = float(np.abs(w).max(initial=0.0))
        if peak > MAX_LORA_WEIGHT:
            raise AdapterError(f"{where}: {label} holds a value of magnitude {peak:.3g}, above {MAX_LORA_WEIGHT:g}")


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
