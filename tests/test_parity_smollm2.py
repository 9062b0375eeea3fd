"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

import numpy as np
import pytest
import torch

from plora_jax import SamplingParams

PROMPTS = [
    "The capital city of France is",  # short
    "In 1905 Albert Einstein published four papers that changed physics. The first explained the "
    "photoelectric effect, the second Brownian motion, and the third",
    " ".join(
        f"Step {i}: mix the flour, water and salt, then knead the dough for {i + 2} minutes and let it rest."
        for i in range(7)
    ),
]


@pytest.fixture(scope="module")
def prompt_ids(engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    lengths = [len(i) for i in ids]
    assert all(5 <= n <= 200 for n in lengths) and max(lengths) >= 150, lengths
    return ids


def test_logits_match_transformers(engine, hf_model, prompt_ids):
    for ids in prompt_ids:
        ours = engine.logits(ids)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        assert ours.shape == ref.shape == (len(ids), 49152)
        assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_continuations_match_transformers(engine, hf_model, prompt_ids):
    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.token_ids == ref[0, len(ids) :].tolist()
        assert out.finish_reason == "length"


def test_chat_answers_paris(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.tokenizer.eos_token_ids


def test_same_model_as_hf_folder(engine, hf_model, hf_tokenizer, tmp_path, prompt_ids):
    """The reference model written as an HF folder (safetensors + tokenizer.json) gives the same logits."""
    import json

    from safetensors.torch import save_file

    from plora_jax import Engine

    # transformers will not save_pretrained a GGUF-loaded model, so write its weights and config.
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf_model).__name__]
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_tokenizer.save_pretrained(tmp_path)
    folder = Engine.from_pretrained(
        str(tmp_path), dtype="float32", max_model_len=512, num_kv_blocks=64, param_cache=False, warmup=False
    )
    assert folder.model_config.tie_word_embeddings
    assert folder.tokenizer.encode(PROMPTS[1]) == prompt_ids[1]
    np.testing.assert_allclose(folder.logits(prompt_ids[1]), engine.logits(prompt_ids[1]), atol=1e-4)
