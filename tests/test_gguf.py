"""GGUF loading: every storage type against transformers on a tiny file, rotary permutation, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import write_tiny_gguf

from plora_jax import CheckpointError, Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.models.gguf_loader import load_gguf, permute_rotary, unpermute_rotary

TEXT = "the cat sat in a hat, then the end"


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_gguf_matches_transformers(tmp_path, qtype):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(path, qtype)
    config, params, tokenizer = load_gguf(path, jnp.float32)
    engine = Engine.from_params(
        config, params, tokenizer, dtype="float32", max_model_len=128, num_kv_blocks=32, warmup=False
    )
    ids = tokenizer.encode(TEXT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert hf_tok(TEXT)["input_ids"] == ids
    assert np.abs(engine.logits(ids) - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("qtype", "low", "high"), [("F16", 0, 1e-3), ("Q8_0", 1e-4, 2e-3), ("Q4_0", 2e-3, 0.05), ("Q4_1", 2e-3, 0.05)]
)
def test_dequantized_weights_are_close_to_the_originals(tmp_path, qtype, low, high):
    _, tensors = write_tiny_gguf(tmp_path / "t.gguf", qtype)
    _, params, _ = load_gguf(tmp_path / "t.gguf", jnp.float32)
    # Rows of q_proj went through permute -> quantize -> dequantize -> unpermute.
    original = tensors["model.layers.1.self_attn.q_proj.weight"]
    error = np.abs(params["layers_1"]["self_attn"]["q_proj"]["weight"] - original).max()
    assert low <= error <= high


def test_rotary_permutation_hand_worked():
    # One head, head_dim 4: HF rows [a0, a1, b0, b1] (first half a, second half b) become
    # llama.cpp's interleaved pairs [a0, b0, a1, b1].
    hf_rows = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert permute_rotary(hf_rows, 1)[:, 0].tolist() == [0.0, 10.0, 1.0, 11.0]
    assert unpermute_rotary(permute_rotary(hf_rows, 1), 1)[:, 0].tolist() == hf_rows[:, 0].tolist()
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 3), 3), w)


def test_rope_freqs_tensor_sets_frequency_factors(tmp_path):
    factors = np.linspace(1.0, 8.0, tiny().head_dim // 2)
    config, _ = write_tiny_gguf(tmp_path / "r.gguf", "F32", rope_freqs=factors)
    loaded, _, _ = load_gguf(tmp_path / "r.gguf", jnp.float32)
    assert loaded.rope.kind == "freq_factors"
    base = 1.0 / config.rope.theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    np.testing.assert_allclose(loaded.rope.inv_freq(config.head_dim), base / factors, rtol=1e-6)


def test_truncated_gguf_names_the_file(tmp_path, smollm_path):
    for source, keep in [(smollm_path, 10_000_000), (None, 3000)]:
        if source is None:
            source = tmp_path / "tiny.gguf"
            write_tiny_gguf(source, "Q8_0")
        cut = tmp_path / f"cut-{keep}.gguf"
        with open(source, "rb") as f:
            cut.write_bytes(f.read(keep))
        with pytest.raises(CheckpointError, match=str(cut)):
            load_gguf(cut, jnp.float32)


def test_unsupported_architecture_names_file_and_field(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, "F32", arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: general\.architecture='gpt2' is not supported"):
        load_gguf(path, jnp.float32)


def test_missing_file_and_engine_from_path(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        load_gguf(tmp_path / "nope.gguf", jnp.float32)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "Q8_0")
    engine = Engine.from_pretrained(
        str(path), cache_dir=str(tmp_path / "cache"), max_model_len=64, num_kv_blocks=16, warmup=False
    )
    out = engine.generate(["the cat"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and out[0].finish_reason == "length"
    assert out[0].text == engine.tokenizer.decode(out[0].token_ids)
