"""Multi-LoRA on the real model against transformers + PEFT: real PEFT adapters (saved by PEFT
itself) of ranks 8, 24 and 64 on different projections, with rsLoRA, rank_pattern and
alpha_pattern; one mixed batch with a base-only row and all three adapters."""

import copy

import numpy as np
import pytest
import torch

from plora_jax import SamplingParams

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ADAPTERS = {
    "r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r24": dict(r=24, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r64": dict(
        r=64,
        lora_alpha=64,
        target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 32},
        alpha_pattern={"o_proj": 128},
    ),
}
PROMPTS = [
    "The capital city of France is",
    "Write a short poem about the sea and the wind",
    "def fibonacci(n):",
    "Three things to remember when baking bread are",
]


@pytest.fixture(scope="module")
def peft_setup(hf_model, engine, tmp_path_factory):
    """Save each adapter with PEFT, register it with the engine, and keep a PEFT model holding all three."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    for name, kwargs in ADAPTERS.items():
        model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:  # non-zero B of a moderate size: outputs change, logits stay sane
                    param.normal_(0.0, 0.02)
        model.save_pretrained(str(root / name))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(root / "r8"), adapter_name="r8")
    for name in ("r24", "r64"):
        reference.load_adapter(str(root / name), adapter_name=name)
    reference.eval()
    for name in ADAPTERS:
        engine.add_adapter(name, root / name)
    yield reference, root
    for name in ADAPTERS:
        engine.remove_adapter(name)


def peft_logits(reference, ids, adapter):
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                return reference(torch.tensor([ids])).logits[0].numpy()
        reference.set_adapter(adapter)
        return reference(torch.tensor([ids])).logits[0].numpy()


def test_adapters_are_listed(engine, peft_setup):
    listed = {a["name"]: a for a in engine.adapters()}
    assert listed["r8"]["rank"] == 8 and listed["r8"]["target_modules"] == ["q_proj", "v_proj"]
    assert listed["r64"]["rank"] == 64 and "down_proj" in listed["r64"]["target_modules"]
    assert all(a["residency"] in ("host", "device") for a in listed.values())


def test_mixed_batch_logits_match_peft(engine, peft_setup):
    reference, _ = peft_setup
    adapters = [None, "r8", "r24", "r64"]
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    ours = engine.logits_batch(ids, adapters)
    for row_ids, adapter, got in zip(ids, adapters, ours, strict=True):
        ref = peft_logits(reference, row_ids, adapter)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-3, adapter
    # The adapters really change the output (a test that cannot fail proves nothing).
    base = peft_logits(reference, ids[1], None)
    assert np.abs(ours[1] - base).max() > 0.05


def test_greedy_continuations_match_peft(engine, peft_setup):
    reference, _ = peft_setup
    adapters = [None, "r8", "r24", "r64"]
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = engine.generate(ids, params, adapters=adapters)
    # Greedy without stopping on EOS on both sides: transformers gets an end token that never
    # occurs (min_new_tokens would instead mask EOS out, changing the argmax).
    never = 49151
    assert all(never not in o.token_ids for o in outs)
    config = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=never, pad_token_id=0)
    for row_ids, adapter, out in zip(ids, adapters, outs, strict=True):
        with torch.no_grad():
            if adapter is None:
                with reference.disable_adapter():
                    ref = reference.generate(input_ids=torch.tensor([row_ids]), generation_config=config)
            else:
                reference.set_adapter(adapter)
                ref = reference.generate(input_ids=torch.tensor([row_ids]), generation_config=config)
        assert out.token_ids == ref[0, len(row_ids) :].tolist(), adapter
    stats = engine.stats()
    assert stats["adapters_on_device"] >= 3 and stats["adapter_pages_used"] >= 1 + 3 + 8
    assert 0 < stats["adapter_mem_util"] <= 1
