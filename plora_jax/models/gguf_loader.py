"""GGUF checkpoints (llama.cpp format) through the `gguf` package.

What differs from a Hugging Face checkpoint, and is undone here:

- tensor names (`blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`);
- quantized storage: Q4_0, Q4_1, Q8_0, F16, BF16 and F32 (and the other types the `gguf`
  package can dequantize) are expanded to float32, then cast to the compute dtype;
- the rotary layout: llama.cpp's converter permutes the rows of Q and K within each head from
  the half-split layout to interleaved pairs. `unpermute_rotary` puts them back;
- configuration and tokenizer live in metadata fields (`llama.*`, `tokenizer.ggml.*`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig, RopeConfig
from ..tokenizer import Tokenizer
from .convert import CheckpointError, to_flax_params

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a GGUF tensor name (None for tensors the model does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: [out, in] interleaved pairs -> half-split per head."""
    out_dim = weight.shape[0]
    head_dim = out_dim // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (half-split -> interleaved); used to write test GGUF files."""
    out_dim = weight.shape[0]
    head_dim = out_dim // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def open_gguf(path: Path):
    """Open a GGUF file, turning every low-level failure into a CheckpointError naming it."""
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct/IndexError or OSError on damage
        raise CheckpointError(f"{path}: not a readable GGUF file, it may be truncated or corrupt ({e})") from None


def field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader, path: Path) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture={arch!r} is not supported (supported: {list(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str):
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: missing metadata field {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(field_value(reader, f"{arch}.rope.dimension_count", 0) or hidden // heads)
    tensors = {t.name: t for t in reader.tensors}
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(tensors["token_embd.weight"].shape[-1])

    rope = RopeConfig(theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)))
    scaling = field_value(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
        rope = RopeConfig(theta=rope.theta, kind="freq_factors", freq_factors=tuple(float(f) for f in factors))
    elif scaling == "linear":
        rope = RopeConfig(theta=rope.theta, kind="linear", factor=float(need("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (linear)")

    try:
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope=rope,
            tie_word_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 4096)),
            architecture=arch,
            name=str(field_value(reader, "general.name", path.stem)),
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_gguf(path: str | os.PathLike, dtype) -> tuple[ModelConfig, dict, Tokenizer]:
    """Read a GGUF file into (ModelConfig, Flax params as numpy in `dtype`, Tokenizer)."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tokenizer = Tokenizer.from_gguf(reader, path)
    by_hf_name = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name != "rope_freqs.weight":
                log.debug("%s: ignoring tensor %s", path, tensor.name)
            continue
        by_hf_name[name] = tensor

    def get_tensor(name: str) -> np.ndarray:
        tensor = by_hf_name[name]
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot dequantize tensor {tensor.name} of type {tensor.tensor_type.name} ({e})"
            ) from None
        # GGUF lists dims innermost-first; numpy data is already [out, in] like HF.
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rotary(array, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rotary(array, config.num_kv_heads)
        return array

    params = to_flax_params(config, get_tensor, set(by_hf_name), dtype, str(path))
    return config, params, tokenizer
