"""Checkpoint tensors (Hugging Face names, [out, in] matrices) -> the Flax parameter tree.

Both loaders end here: the HF loader reads safetensors directly; the GGUF loader first renames
GGUF tensors to HF names and undoes GGUF's rotary row permutation. This module places each
layer's matrices under `layers_{i}` (the model unrolls its layers, one subtree each), keeps
them in the checkpoints' own [out, in] layout (the model computes W @ x on feature-major
activations), casts to the compute dtype and checks every shape against the model's own
`eval_shape`, so a checkpoint that does not fit its config fails with the tensor's name.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from ..config import ModelConfig
from ..progress import Progress
from .llama import param_shapes


class CheckpointError(ValueError):
    """A model file or folder cannot be used; the message names the file and the problem."""


# Flax path under params['layers_{i}'] -> HF tensor suffix under model.layers.{i}.
_LAYER_TENSORS = {
    ("input_layernorm", "scale"): "input_layernorm.weight",
    ("post_attention_layernorm", "scale"): "post_attention_layernorm.weight",
    ("self_attn", "q_proj", "weight"): "self_attn.q_proj.weight",
    ("self_attn", "k_proj", "weight"): "self_attn.k_proj.weight",
    ("self_attn", "v_proj", "weight"): "self_attn.v_proj.weight",
    ("self_attn", "o_proj", "weight"): "self_attn.o_proj.weight",
    ("mlp", "gate_proj", "weight"): "mlp.gate_proj.weight",
    ("mlp", "up_proj", "weight"): "mlp.up_proj.weight",
    ("mlp", "down_proj", "weight"): "mlp.down_proj.weight",
}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def to_flax_params(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    names: set[str],
    dtype,
    source: str,
) -> dict:
    """Build the Flax params tree from HF-named tensors.

    Args:
      get_tensor: returns a float numpy array for an HF tensor name (read lazily, so a large
        checkpoint is converted one tensor at a time).
      names: every tensor name the checkpoint holds (to report missing ones up front).
      source: file or folder named in errors.
    """
    expected = param_shapes(config, dtype)
    required = {"model.embed_tokens.weight", "model.norm.weight"}
    required |= {f"model.layers.{i}.{s}" for i in range(config.num_layers) for s in _LAYER_TENSORS.values()}
    if not config.tie_word_embeddings:
        required.add("lm_head.weight")
    missing = sorted(required - names)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}")

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = np.asarray(get_tensor(name))
        if array.shape != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {array.shape}, the config expects {tuple(shape)}")
        if not np.isfinite(array.astype(np.float32)).all():
            raise CheckpointError(f"{source}: tensor {name} contains NaN or Inf")
        return array.astype(dtype)

    jobs: list[tuple[tuple[str, ...], str, tuple[int, ...]]] = [
        (("embed_tokens", "embedding"), "model.embed_tokens.weight", expected["embed_tokens"]["embedding"].shape),
        (("norm", "scale"), "model.norm.weight", expected["norm"]["scale"].shape),
    ]
    if not config.tie_word_embeddings:
        jobs.append((("lm_head", "weight"), "lm_head.weight", expected["lm_head"]["weight"].shape))
    for i in range(config.num_layers):
        for path, suffix in _LAYER_TENSORS.items():
            leaf = expected[f"layers_{i}"]
            for key in path:
                leaf = leaf[key]
            jobs.append(((f"layers_{i}", *path), f"model.layers.{i}.{suffix}", leaf.shape))
    params: dict = {}
    # Dequantizing and checking are numpy work that releases the GIL: two threads use two cores.
    with (
        Progress(len(jobs), f"plora converting {Path(source).name}", unit="tensor") as bar,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="plora-convert") as pool,
    ):
        for (path, _, _), array in zip(jobs, pool.map(lambda job: fetch(job[1], job[2]), jobs), strict=True):
            _set(params, path, array)
            bar.update(1)

    # Structure check: the tree must match the model's exactly (catches a renamed module).
    got = jax.tree_util.tree_structure(params)
    want = jax.tree_util.tree_structure(expected)
    if got != want:
        raise CheckpointError(f"{source}: converted parameter tree {got} does not match the model's {want}")
    return params
