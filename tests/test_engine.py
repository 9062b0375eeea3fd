"""Engine on tiny random models: continuous batching, seeds, compiles, donation, blocks, preemption, errors."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.models.llama import init_params

CONFIG = tiny()
PARAMS = init_params(CONFIG, jnp.float32, seed=3, scale=0.1)
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def make_engine(**overrides) -> Engine:
    # Engine mechanics without the LoRA code in the steps (quicker to compile); the warm-up test
    # below and the tests/test_lora_* files run with it.
    options = dict(
        max_model_len=96,
        num_kv_blocks=40,
        block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        warmup=False,
        max_loras=0,
    )
    return Engine.from_params(CONFIG, PARAMS, **{**options, **overrides})


@pytest.fixture(scope="module")
def tiny_engine():
    with make_engine() as engine:
        yield engine


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, size=int(rng.integers(1, 70))).tolist() for _ in range(n)]


def step(engine: Engine, n: int) -> None:
    """Run n iterations of an engine built with start=False, on this thread."""
    for _ in range(n):
        engine.core.step()


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_continuous_batching_is_exact():
    """12 requests of different lengths, arriving at different steps, equal each run alone."""
    ps = prompts(12, seed=1)
    params = [SamplingParams(max_tokens=int(n), temperature=0, ignore_eos=True) for n in np.arange(12) % 5 + 4]
    with make_engine(start=False) as engine:
        handles = []
        for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
            handles.append(engine.submit(p, sp))
            if i % 3 == 2:
                step(engine, 2)
        engine.core.run_until_idle()
        together = [h.result(timeout=0) for h in handles]
        alone = [engine.generate([p], sp)[0] for p, sp in zip(ps, params, strict=True)]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        assert all(len(o.token_ids) == sp.max_tokens for o, sp in zip(together, params, strict=True))
        assert engine.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    ps = prompts(3, seed=2)
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = tiny_engine.generate([ps[1]], sp)[0].token_ids
    mixed = tiny_engine.generate(ps, [SamplingParams(max_tokens=5, temperature=0.7), sp, SamplingParams(max_tokens=3)])
    assert mixed[1].token_ids == alone
    other = tiny_engine.generate([ps[1]], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99))
    assert other[0].token_ids != alone


def test_logprobs_are_those_of_the_distribution_sampled_from(tiny_engine):
    """Each token's log-probability, and the top 5 at each position, under the model's logits
    divided by the temperature (greedy: the model's own), from the scoring path's logits."""
    p = prompts(1, seed=4)[0]
    for temperature in (0.8, 0.0):
        params = SamplingParams(max_tokens=6, temperature=temperature, seed=5, logprobs=True, top_logprobs=5)
        out = tiny_engine.generate([p], params)[0]
        logits = tiny_engine.logits(p + out.token_ids[:-1])[len(p) - 1 :]
        scaled = jax.nn.log_softmax(logits / (temperature or 1.0), axis=-1)
        expected = scaled[np.arange(len(out.token_ids)), out.token_ids]
        np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)
        for position, top in enumerate(out.top_logprobs):
            ids, values = zip(*top, strict=True)
            assert list(ids) == np.argsort(-np.asarray(scaled[position]))[:5].tolist()
            np.testing.assert_allclose(values, np.asarray(scaled[position])[list(ids)], atol=1e-4)
        if temperature == 0:
            assert all(top[0][0] == t for top, t in zip(out.top_logprobs, out.token_ids, strict=True))
    plain = tiny_engine.generate([p], SamplingParams(max_tokens=2))[0]
    assert plain.logprobs is None and plain.top_logprobs is None
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21)


def penalised_greedy(engine, prompt, sp) -> list[int]:
    """Greedy tokens under `sp`'s penalties, by hand: the model's logits of each position
    (`Engine.logits`), penalised in numpy as OpenAI and vLLM define it, then the argmax."""
    out: list[int] = []
    for _ in range(sp.max_tokens):
        logits = engine.logits(prompt + out)[-1].astype(np.float64)
        counts = np.bincount(np.asarray(out, np.int64), minlength=logits.size)
        seen = counts > 0
        seen[prompt] = True
        rep = sp.repetition_penalty
        logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)
        out.append(int(np.argmax(logits)))
    return out


PENALTIES = [
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(repetition_penalty=3.0),
    dict(frequency_penalty=-0.5, presence_penalty=0.5, repetition_penalty=0.8),
]


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_penalties_change_greedy_output_as_computed_by_hand(tiny_engine, penalty):
    """Each penalty, sampled in one batch with an unpenalised request and a second penalised
    one, gives the hand-computed greedy tokens; without it the tokens differ (so a sampler that
    ignored it fails), and the unpenalised neighbour is untouched."""
    prompt = [7, 7, 7, 9, 3, 7]
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **penalty)
    expected = penalised_greedy(tiny_engine, prompt, sp)
    reference = tiny_engine.generate([prompt], plain)[0].token_ids
    assert expected != reference
    outs = tiny_engine.generate([prompt, [1, 2, 3, 2, 1], prompt], [sp, sp, plain])
    assert outs[0].token_ids == expected
    assert outs[1].token_ids == penalised_greedy(tiny_engine, [1, 2, 3, 2, 1], sp)
    assert outs[2].token_ids == reference


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_penalties_survive_preemption_and_slot_reuse():
    """A penalised request preempted under block pressure (its tables rebuilt by the recompute
    prefill) and requests reusing its slots give the same tokens as with room for all."""
    ps = prompts(6, seed=9)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=0.7, repetition_penalty=1.3)
    with make_engine(num_kv_blocks=20) as small, make_engine(num_kv_blocks=200) as large:
        pressured = small.generate(ps, sp)
        assert small.stats()["num_preemptions"] > 0
        assert [o.token_ids for o in pressured] == [o.token_ids for o in large.generate(ps, sp)]
        assert pressured[0].token_ids == penalised_greedy(large, ps[0], sp)


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_no_compiles_after_warmup_over_mixed_steps():
    """Arrivals, finishes, cancels and preemptions over 200+ steps trigger no compilation."""
    with make_engine(
        max_model_len=256,
        num_kv_blocks=41,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_prefill_seqs=2,
        warmup=True,
        max_loras=4,
        start=False,
    ) as engine:
        engine.runner.plan.complete.wait()
        warm = engine.stats()
        assert warm["executables_ready"] == warm["executables"] and warm["compiles_after_warmup"] == 0
        rng = np.random.default_rng(7)
        handles, cancelled = [], []
        while engine.stats()["steps"] < 200:
            for _ in range(int(rng.integers(0, 3))):
                prompt = rng.integers(1, 256, size=int(rng.integers(1, 120))).tolist()
                sp = SamplingParams(
                    max_tokens=int(rng.integers(1, 80)),
                    temperature=float(rng.choice([0, 0.9])),
                    top_k=int(rng.choice([-1, 5])),
                    top_p=float(rng.choice([1.0, 0.8])),
                    ignore_eos=True,
                )
                handles.append((prompt, sp, engine.submit(prompt, sp)))
            if handles and rng.random() < 0.1:
                victim = handles[int(rng.integers(len(handles)))][2]
                victim.cancel()
                cancelled.append(victim)
            step(engine, int(rng.integers(1, 4)))
        engine.core.run_until_idle()
        outputs = [h.result(timeout=0) for _, _, h in handles]
        stats = engine.stats()
        assert stats["steps"] >= 200 and stats["num_preemptions"] > 0
        assert stats["compiles_after_warmup"] == 0, stats
        assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
        assert any(o.finish_reason == "abort" for o in outputs)
        # Preempted and recomputed requests still give exactly their solo output.
        solo = make_engine(max_model_len=256, num_kv_blocks=41)
        checked = [
            (p, sp, out)
            for (p, sp, h), out in zip(handles, outputs, strict=True)
            if h not in cancelled and sp.temperature == 0
        ][:10]
        assert len(checked) >= 3
        for prompt, sp, out in checked:
            assert out.token_ids == solo.generate([prompt], sp)[0].token_ids
        solo.close()


def test_donation_really_frees_the_previous_cache():
    with make_engine(start=False) as engine:
        before = engine.runner.state
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3))
        assert all(a.is_deleted() for a in (*before.kv.k, *before.kv.v, before.last_tokens))


def test_preemption_under_block_pressure_completes_every_request():
    ps = prompts(6, seed=9)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    with make_engine(num_kv_blocks=20) as small, make_engine(num_kv_blocks=200) as large:
        pressured = small.generate(ps, sp)
        reference = large.generate(ps, sp)
        assert small.stats()["num_preemptions"] > 0
        assert [o.token_ids for o in pressured] == [o.token_ids for o in reference]
        assert any(o.metrics.num_preemptions for o in pressured)
        assert small.stats()["kv_blocks_used"] == 0


def test_cancel_frees_everything(tiny_engine):
    handle = tiny_engine.submit(prompts(1)[0], SamplingParams(max_tokens=80, ignore_eos=True))
    events = iter(handle)
    next(events)
    handle.cancel()
    out = handle.result(timeout=30)
    assert out.finish_reason == "abort" and len(out.token_ids) < 80
    stream = tiny_engine.stream([5, 6, 7], SamplingParams(max_tokens=80, ignore_eos=True))
    stream.close()  # closing a stream early cancels its request
    # The inbox is first in, first out: once a later request is served, the cancel was handled.
    tiny_engine.generate([[1]], SamplingParams(max_tokens=1))
    stats = tiny_engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_bad_input_names_the_field_and_others_keep_running(tiny_engine):
    long_run = tiny_engine.submit([1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True))
    sp = SamplingParams(max_tokens=4)
    cases = [
        (([[]], sp), r"prompts\[0\] is empty"),
        (([list(range(96))], sp), r"prompts\[0\] has 96 tokens"),
        (([[1, 2], [300]], sp), r"prompts\[1\] holds token ids outside \[0, 256\)"),
        (([[1]], [sp, sp]), "sampling_params has 2 entries for 1 prompts"),
        (([[1]], sp, ["my-adapter"]), r"adapters\[0\]='my-adapter'"),
        ((["text"], sp), "no tokenizer"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny_engine.generate(*args)
    with pytest.raises(ValueError, match="token_ids is empty"):
        tiny_engine.logits([])
    with pytest.raises(ValueError, match="adapter='x'"):
        tiny_engine.logits([1], adapter="x")
    with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
        tiny_engine.submit([1], SamplingParams(max_tokens=50), request_id="dup")
        tiny_engine.submit([1], sp, request_id="dup")
    assert len(long_run.result(timeout=60).token_ids) == 60  # kept serving
    assert len(tiny_engine.generate([[1, 2]], sp)[0].token_ids) == 4


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, r"max_tokens must be an integer in \[1, 2147483647\]"),
        ("max_tokens", 2**31, r"max_tokens must be an integer in \[1, 2147483647\]"),
        ("temperature", -0.5, r"temperature must be a number in \[0, 2.0\]"),
        ("temperature", float("nan"), r"temperature must be a number in \[0, 2.0\]"),
        ("top_k", 2**31, r"top_k must be -1, 0 \(disabled\) or in \[1, 2147483647\]"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("top_k", -2, "top_k must be"),
        ("seed", -1, "seed must be"),
        ("stop", [""], "stop must be"),
        ("frequency_penalty", 2.5, r"frequency_penalty must be a number in \[-2.0, 2.0\]"),
        ("presence_penalty", "1", r"presence_penalty must be a number in \[-2.0, 2.0\]"),
        ("repetition_penalty", 0, r"repetition_penalty must be a number in \[0.01, 100.0\]"),
    ],
)
def test_sampling_params_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['max_batch'\]"):
        Engine.from_pretrained("llama", max_batch=3)
    with pytest.raises(ValueError, match="num_kv_blocks=4 cannot hold one sequence"):
        Engine.from_params(CONFIG, PARAMS, max_model_len=128, num_kv_blocks=4)
    with pytest.raises(ValueError, match="dtype must be"):
        Engine.from_params(CONFIG, PARAMS, dtype="float16")


def test_stats_and_threads(tiny_engine):
    stats = tiny_engine.stats()
    for key in ("compiles_total", "compiles_after_warmup", "running", "waiting", "kv_blocks_used", "kv_blocks_total"):
        assert key in stats
    assert stats["kv_blocks_total"] == 39
    # submit from several threads at once
    results = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(tiny_engine.generate([[i + 1]], GREEDY)[0]))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r.token_ids for r in results)


def test_logits_are_float32_per_position(tiny_engine):
    ids = list(range(1, 70))
    logits = tiny_engine.logits(ids)
    assert logits.shape == (69, 256) and logits.dtype == np.float32
    np.testing.assert_allclose(tiny_engine.logits(ids[:10]), logits[:10], atol=1e-5)


def test_closed_engine_refuses_work():
    engine = make_engine()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[1]], GREEDY)
