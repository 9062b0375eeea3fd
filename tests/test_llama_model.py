"""The Flax Llama on tiny random configurations, against transformers and against itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from plora_jax import CheckpointError, Engine, SamplingParams
from plora_jax.config import llama3_8b, tiny
from plora_jax.models.hf_loader import load_hf_folder
from plora_jax.models.llama import init_params, param_shapes

TOKENS = np.random.default_rng(0).integers(0, 256, size=45).tolist()


def _hf_tiny(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    if kind == "llama3-rope-untied":
        cfg = transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        return transformers.LlamaForCausalLM(cfg)
    if kind == "linear-rope-tied":
        cfg = transformers.LlamaConfig(
            **common, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
        )
        return transformers.LlamaForCausalLM(cfg)
    if kind == "mistral-sliding-window":
        cfg = transformers.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
        return transformers.MistralForCausalLM(cfg)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama3-rope-untied", "linear-rope-tied", "mistral-sliding-window"])
def test_hf_folder_matches_transformers(tmp_path, kind):
    model = _hf_tiny(kind).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards + an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    config, params = load_hf_folder(tmp_path, jnp.float32)
    engine = Engine.from_params(
        config, params, max_model_len=128, num_kv_blocks=32, max_num_batched_tokens=16, warmup=False
    )
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(engine.logits(TOKENS) - ref).max() < 1e-5


@pytest.mark.slow  # compiles a warm-up plan or many executables
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_random_model_runs(dtype):
    config = tiny()
    params = init_params(config, jnp.dtype(dtype), seed=1, scale=0.1)
    engine = Engine.from_params(config, params, dtype=dtype, max_model_len=128, num_kv_blocks=32, warmup=False)
    logits = engine.logits(TOKENS[:20])
    assert logits.dtype == np.float32 and logits.shape == (20, 256) and np.isfinite(logits).all()
    out = engine.generate([TOKENS[:5]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    if dtype == "bfloat16":
        f32 = Engine.from_params(
            config,
            jax.tree.map(lambda a: a.astype(np.float32), params),
            dtype="float32",
            max_model_len=128,
            num_kv_blocks=32,
            warmup=False,
        )
        assert np.abs(f32.logits(TOKENS[:20]) - logits).max() < 0.1


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_chunked_prefill_and_decode_agree_with_one_pass():
    """Logits in chunks of 16 equal one pass; each greedy token is the argmax of a full re-score."""
    config = tiny()
    params = init_params(config, jnp.float32, seed=2, scale=0.1)
    one_pass = Engine.from_params(config, params, max_model_len=128, num_kv_blocks=32, warmup=False)
    chunked = Engine.from_params(
        config, params, max_model_len=128, num_kv_blocks=32, max_num_batched_tokens=16, warmup=False
    )
    np.testing.assert_allclose(chunked.logits(TOKENS), one_pass.logits(TOKENS), atol=1e-5)
    out = chunked.generate([TOKENS[:21]], SamplingParams(max_tokens=10, temperature=0))[0]
    rescored = one_pass.logits(TOKENS[:21] + out.token_ids[:-1])
    assert rescored[20:].argmax(-1).tolist() == out.token_ids


def test_real_size_shapes_without_allocating():
    config = llama3_8b()
    shapes = param_shapes(config, jnp.bfloat16)
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == config.num_params and 8.0e9 < count < 8.1e9
    assert shapes["layers_31"]["self_attn"]["k_proj"]["weight"].shape == (1024, 4096)  # [out, in]


def test_hf_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf_folder(tmp_path, jnp.float32)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(CheckpointError, match=r"config\.json: architectures=\['GPT2LMHeadModel'\] is not supported"):
        load_hf_folder(tmp_path, jnp.float32)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_hf_folder(tmp_path, jnp.float32)


def test_hf_folder_weight_errors(tmp_path):
    model = _hf_tiny("llama3-rope-untied")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are refused"):
        load_hf_folder(tmp_path, jnp.float32)
    (tmp_path / "pytorch_model.bin").unlink()
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf_folder(tmp_path, jnp.float32)
    state["model.norm.weight"] = torch.ones(32)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(32,\), the config expects \(64,\)"):
        load_hf_folder(tmp_path, jnp.float32)


def test_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(tiny(), num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        dataclasses.replace(tiny().rope, kind="yarn")
