"""Hugging Face checkpoint folders: config.json + *.safetensors (single file or sharded index).

Supported architectures: LlamaForCausalLM and MistralForCausalLM. The HF Llama layout already
uses the half-split rotary convention this model implements, so tensors only need renaming-free
stacking and transposition (done by `convert.to_flax_params`). Pickled `.bin` checkpoints are
refused: loading them would execute code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig, RopeConfig
from .convert import CheckpointError, to_flax_params

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _rope_from_hf(cfg: dict, path: Path) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (holding rope_theta); older configs use
    # top-level `rope_theta` and `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{path}: rope_scaling.rope_type={kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
    )


def config_from_hf(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json in this folder (expected a Hugging Face model folder)")
    cfg = _read_json(path)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{path}: architectures={archs} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act={act!r} is not supported (silu)")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope=_rope_from_hf(cfg, path),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=cfg.get("sliding_window") if arch == "MistralForCausalLM" else None,
            architecture=SUPPORTED_ARCHITECTURES[arch],
            name=cfg.get("_name_or_path") or folder.name,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing field weight_map")
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} is listed but missing")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {pickled}: pickled weights are refused, convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    from safetensors import safe_open

    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as f:
            files.update(dict.fromkeys(f.keys(), shard))
    return files


def load_hf_folder(folder: str | os.PathLike, dtype) -> tuple[ModelConfig, dict]:
    """Read an HF folder into (ModelConfig, Flax params as numpy in `dtype`)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config = config_from_hf(folder)
    files = _weight_files(folder)
    handles: dict[Path, object] = {}

    def get_tensor(name: str) -> np.ndarray:
        path = files[name]
        try:
            if path not in handles:
                handles[path] = safe_open(str(path), framework="numpy")
            return handles[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None

    params = to_flax_params(config, get_tensor, set(files), dtype, str(folder))
    return config, params
