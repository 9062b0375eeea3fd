"""Test utilities: tiny checkpoints written in the real formats (GGUF, HF folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plora_jax.config import ModelConfig, tiny
from plora_jax.models.gguf_loader import permute_rotary

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = 0
    chars = []
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocab() -> list[str]:
    return SPECIALS + byte_chars() + [m.replace(" ", "") for m in MERGES]


def tiny_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named float32 tensors for `config` (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    d, hd = config.hidden_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (config.num_heads * hd, d),
            p + "self_attn.k_proj.weight": (config.num_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (config.num_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, config.num_heads * hd),
            p + "mlp.gate_proj.weight": (config.intermediate_size, d),
            p + "mlp.up_proj.weight": (config.intermediate_size, d),
            p + "mlp.down_proj.weight": (d, config.intermediate_size),
        }
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.08 * rng.standard_normal(shape)).astype(np.float32)
    return out


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(
    path: Path,
    qtype: str = "F32",
    config: ModelConfig | None = None,
    seed: int = 0,
    arch: str = "llama",
    rope_freqs: np.ndarray | None = None,
) -> tuple[ModelConfig, dict]:
    """Write a tiny llama GGUF as llama.cpp's converter would (Q/K rows permuted, matrices in `qtype`)."""
    import gguf

    config = config or tiny(vocab_size=len(tiny_vocab()))
    tensors = tiny_tensors(config, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, array in tensors.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gname = f"blk.{i}.{_GGUF_NAMES[module]}.weight"
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if name.endswith("q_proj.weight"):
            array = permute_rotary(array, config.num_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_rotary(array, config.num_kv_heads)
        if array.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, array)
        elif qt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, array.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(array, qt), raw_dtype=qt)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return config, tensors


def write_peft_adapter(path: Path, config: ModelConfig, rank: int, targets=("q_proj", "v_proj"), **kwargs) -> Path:
    from plora_jax.lora.peft import save_random_adapter

    return save_random_adapter(path, config, rank, targets, **kwargs)


def tiny_lora_engine(config: ModelConfig, **overrides):
    """A tiny random-weight LoRA engine driven on the test thread (start=False: `generate`
    steps it itself); `overrides` are EngineConfig fields."""
    import jax.numpy as jnp

    from plora_jax import Engine
    from plora_jax.models.llama import init_params

    params = init_params(config, jnp.float32, seed=3, scale=0.2)
    options = dict(warmup=False, max_model_len=512, max_num_seqs=4, num_kv_blocks=80, lora_pool_pages=40, start=False)
    return Engine.from_params(config, params, **(options | overrides))
