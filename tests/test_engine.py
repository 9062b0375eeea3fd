"""Engine API on tiny random models: validation, batching, seeds, KV-block accounting."""

import jax.numpy as jnp
import numpy as np
import pytest

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.models.llama import init_params

PROMPTS = [[5, 9, 13], list(range(20, 57)), [7] * 12, list(range(100, 119))]


@pytest.fixture(scope="module")
def tiny_engine():
    config = tiny()
    return Engine.from_params(
        config,
        init_params(config, jnp.float32, seed=3, scale=0.1),
        max_model_len=96,
        num_kv_blocks=40,
        block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=32,
    )


def test_batched_greedy_equals_each_alone(tiny_engine):
    sp = SamplingParams(max_tokens=12, temperature=0)
    together = tiny_engine.generate(PROMPTS, sp)
    for prompt, out in zip(PROMPTS, together, strict=True):
        assert out.token_ids == tiny_engine.generate([prompt], sp)[0].token_ids
        assert out.prompt_token_ids == prompt
    assert [o.index for o in together] == [0, 1, 2, 3]
    assert tiny_engine._blocks.num_used == 0


def test_more_requests_than_rows_and_blocks(tiny_engine):
    # 10 requests, 4 rows, 39 free blocks of 8 tokens: admission waits for blocks to come back.
    prompts = [list(range(10 + i, 40 + i)) for i in range(10)]
    outs = tiny_engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    assert all(len(o.token_ids) == 20 for o in outs)
    assert (
        outs[3].token_ids
        == tiny_engine.generate([prompts[3]], SamplingParams(max_tokens=20, temperature=0))[0].token_ids
    )
    assert tiny_engine._blocks.num_used == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = tiny_engine.generate([PROMPTS[1]], sp)[0].token_ids
    mixed = tiny_engine.generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2]],
        [SamplingParams(max_tokens=5, temperature=0.7), sp, SamplingParams(max_tokens=3)],
    )
    assert mixed[1].token_ids == alone
    other = tiny_engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99))
    assert other[0].token_ids != alone


def test_stop_token_ids_and_context_limit(tiny_engine):
    greedy = tiny_engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    stop = greedy[3]
    out = tiny_engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == greedy[: greedy.index(stop) + 1] and out.finish_reason == "stop"
    long_prompt = list(range(1, 90))
    out = tiny_engine.generate([long_prompt], SamplingParams(max_tokens=50, temperature=0))[0]
    assert len(long_prompt) + len(out.token_ids) == 96 and out.finish_reason == "length"


def test_bad_input_names_the_field(tiny_engine):
    sp = SamplingParams(max_tokens=4)
    cases = [
        (([[]], sp), r"prompts\[0\] is empty"),
        (([list(range(96))], sp), r"prompts\[0\] has 96 tokens"),
        (([[1, 2], [300]], sp), r"prompts\[1\] holds token ids outside \[0, 256\)"),
        (([[1]], [sp, sp]), "sampling_params has 2 entries for 1 prompts"),
        (([[1]], sp, ["my-adapter"]), r"adapters\[0\]='my-adapter': no adapter"),
        ((["text"], sp), "no tokenizer"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny_engine.generate(*args)
    with pytest.raises(ValueError, match="token_ids is empty"):
        tiny_engine.logits([])
    with pytest.raises(ValueError, match="adapter='x'"):
        tiny_engine.logits([1], adapter="x")
    # the engine keeps serving after rejected input
    assert len(tiny_engine.generate([[1, 2]], sp)[0].token_ids) == 4
    assert tiny_engine._blocks.num_used == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens must be an integer >= 1"),
        ("temperature", -0.5, "temperature must be >= 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("top_k", -2, "top_k must be"),
        ("seed", -1, "seed must be"),
    ],
)
def test_sampling_params_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_engine_options_are_checked():
    config = tiny()
    params = init_params(config, jnp.float32)
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['max_batch'\]"):
        Engine.from_pretrained("llama", max_batch=3)
    with pytest.raises(ValueError, match="num_kv_blocks=4 cannot hold one sequence"):
        Engine.from_params(config, params, max_model_len=128, num_kv_blocks=4)
    with pytest.raises(ValueError, match="dtype must be"):
        Engine.from_params(config, params, dtype="float16")


def test_logits_are_float32_per_position(tiny_engine):
    ids = list(range(1, 70))
    logits = tiny_engine.logits(ids)
    assert logits.shape == (69, 256) and logits.dtype == np.float32
    np.testing.assert_allclose(tiny_engine.logits(ids[:10]), logits[:10], atol=1e-5)
