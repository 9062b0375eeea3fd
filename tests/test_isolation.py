"""A request's failure is its own, on a tiny engine driven step by step: an error in one
request's work on the loop fails that request and the loop serves on; sampling values at their
bounds run on the device and those past them are refused where they are made; an adapter whose
weights on the device are non-finite changes nothing for the requests packed with it or those
that reuse its KV blocks; a background build that fails leaves the engine serving; a dying loop
tells every request even when publishing fails; a hung step shows on readiness; a folder
swapped after registration is not loaded; a client that leaves frees its KV blocks within a
step; a script that never closes its engine exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_lora_engine, write_peft_adapter, write_tiny_gguf

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.engine.compile_plan import CompilePlan
from plora_jax.engine.errors import EngineDead
from plora_jax.engine.outputs import RequestFailed
from plora_jax.limits import MAX_TOP_K, SEED_BOUND
from plora_jax.models.llama import init_params

CFG = tiny()
PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 11], [9, 8, 7, 6, 5], [100, 101, 102, 103, 104, 105, 106]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[1]


def make_engine(**overrides):
    return tiny_lora_engine(CFG, **(dict(max_model_len=256, num_kv_blocks=64) | overrides))


@pytest.fixture
def engine():
    engine = make_engine(policy="lru")
    yield engine
    engine.close()


class Exploding(frozenset):
    def __contains__(self, item):
        raise RuntimeError("exploded")


@pytest.mark.parametrize("where", ["arrival", "tokens"])
def test_an_error_in_one_requests_work_fails_it_alone(engine, monkeypatch, where):
    """The loop meets an exception that belongs to one request (on its arrival, or in the stop
    check of its tokens): that request fails with it, its KV blocks and slot are freed, the
    request beside it finishes, and the engine serves the next one."""
    solo = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    bad = engine._inputs.make_request(PROMPTS[1], GREEDY, None)
    if where == "tokens":
        bad.stop_ids = Exploding()
    else:
        add = engine.core.scheduler.add
        monkeypatch.setattr(
            engine.core.scheduler,
            "add",
            lambda r: (_ for _ in ()).throw(RuntimeError("exploded")) if r is bad else add(r),
        )
    good = engine.submit(PROMPTS[0], GREEDY)
    handle = engine._enqueue(bad)
    engine.core.run_until_idle()
    with pytest.raises(RequestFailed, match="exploded"):
        handle.result(timeout=0)
    assert good.result(timeout=0).token_ids == solo
    stats = engine.stats(fresh=True)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert engine.readiness()["status"] == "ok"
    assert engine.generate([PROMPTS[0]], GREEDY)[0].token_ids == solo


def test_sampling_values_at_their_bounds_run_and_past_them_are_refused(engine):
    for bad in (dict(top_k=2**31), dict(seed=SEED_BOUND), dict(temperature=float("inf")), dict(stop=["x" * 513])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.submit(PROMPTS[0], SamplingParams(stop_token_ids=(CFG.vocab_size,)))
    extremes = [
        SamplingParams(max_tokens=3, top_k=MAX_TOP_K, seed=SEED_BOUND - 1, temperature=2.0),
        SamplingParams(max_tokens=3, top_k=-1, seed=SEED_BOUND - 1, temperature=2.0),
        SamplingParams(max_tokens=3, repetition_penalty=100.0, frequency_penalty=-2.0, presence_penalty=2.0),
        SamplingParams(max_tokens=3, repetition_penalty=0.01, logprobs=True, top_logprobs=20, top_p=1e-9),
    ]
    outs = engine.generate([PROMPTS[0]] * 4, extremes)
    assert all(len(o.token_ids) == 3 for o in outs)
    assert outs[0].token_ids == outs[1].token_ids  # top_k beyond the vocabulary is all of it
    assert np.isfinite(outs[3].logprobs).all()


def test_non_finite_adapter_weights_on_the_device_never_reach_other_requests(tmp_path):
    """Weights that passed the file checks but are Inf on the device (a bad copy, a kernel bug):
    the adapter's request gets garbage, the base-model requests packed into the same prefill
    step, and later ones reusing its freed KV blocks, get exactly their solo tokens."""
    engine = make_engine(policy="lru", host_cache_mb=0, max_prefill_seqs=4)
    try:
        engine.add_adapter("poison", write_peft_adapter(tmp_path / "poison", CFG, 8, ("v_proj", "k_proj")))
        solo = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        lora = engine.core.lora
        read = lora._read

        def poisoned(*args):
            copy = read(*args)
            for pages in copy.b_pages.values():
                pages[...] = np.inf
            return copy

        lora._read = poisoned
        engine.prefetch("poison")
        engine.core.wait_for_adapter("poison")
        handles = [engine.submit(PROMPTS[2], GREEDY, "poison")] + [engine.submit(p, GREEDY) for p in PROMPTS]
        before = engine.stats(fresh=True)["prefill_steps"]
        engine.core.step()  # one packed prefill holds all four (its 28 tokens fit one step)
        assert engine.stats()["prefill_steps"] == before + 1 and engine.stats()["running"] == 4
        poisoned_blocks = set(next(r for r in engine.core.scheduler.running if r.adapter == "poison").blocks)
        engine.core.run_until_idle()
        assert [h.result(timeout=0).token_ids for h in handles[1:]] == solo
        later = [engine.submit(p, GREEDY) for p in PROMPTS + PROMPTS]
        engine.core.step()
        reused = {b for r in engine.core.scheduler.running for b in r.blocks} & poisoned_blocks
        assert reused, "the later requests did not reuse the poisoned request's KV blocks"
        engine.core.run_until_idle()
        assert [h.result(timeout=0).token_ids for h in later] == solo + solo
    finally:
        engine.close()


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_a_background_build_that_fails_leaves_the_engine_serving(tmp_path, monkeypatch):
    """The largest prefill size fails to build after serving began: prompts are chunked to the
    sizes built, for good, instead of the engine dying at the first long prompt."""
    build = CompilePlan.build

    def failing(self, kind, size):
        if kind == "prefill" and size == self.buckets.prefill[-1]:
            raise RuntimeError("injected build failure")
        return build(self, kind, size)

    monkeypatch.setattr(CompilePlan, "build", failing)
    params = init_params(CFG, jnp.float32, seed=3, scale=0.2)
    options = dict(max_model_len=256, max_num_seqs=2, num_kv_blocks=64, max_loras=0, max_num_batched_tokens=128)
    engine = Engine.from_params(CFG, params, warmup=True, compilation_cache=False, cache_dir=str(tmp_path), **options)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.wait_warm()
        long_prompt = list(range(1, 150))
        out = engine.generate([long_prompt], SamplingParams(max_tokens=3, temperature=0))[0]
        assert len(out.token_ids) == 3 and engine.readiness()["status"] == "ok"
    finally:
        engine.close()


def test_a_dying_loop_tells_every_request_even_if_publishing_fails(engine, monkeypatch):
    handles = [engine.submit(p, GREEDY) for p in PROMPTS]
    engine.core.step()  # admitted and prefilled

    def lost(*_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "decode", lost)
    monkeypatch.setattr(engine.core, "_publish_snapshot", lambda: (_ for _ in ()).throw(MemoryError("no memory")))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.core.step()
    for handle in handles:
        with pytest.raises(RequestFailed, match="device lost"):
            handle.result(timeout=0)
    assert engine.core.died.is_set() and engine.readiness()["status"] == "failed"
    with pytest.raises(EngineDead):
        engine.submit(PROMPTS[0], GREEDY)


def test_a_hung_step_shows_as_stalled_until_it_ends():
    engine = make_engine(step_timeout_s=0.001, start=True, max_loras=0)
    try:
        release, entered = threading.Event(), threading.Event()
        caller = threading.Thread(target=engine.core.call, args=(lambda: (entered.set(), release.wait()),))
        caller.start()
        entered.wait()
        for _ in range(1_000_000):  # a millisecond's bound: it holds at once
            if engine.readiness()["status"] == "stalled":
                break
        assert engine.readiness()["status"] == "stalled"
        assert "has run for" in engine.readiness()["detail"]
        release.set()
        caller.join()
        assert engine.readiness()["status"] == "ok"
    finally:
        engine.close()


def test_a_folder_swapped_after_registration_is_not_loaded(engine, tmp_path):
    root = tmp_path / "adapters"
    write_peft_adapter(root / "a", CFG, rank=8)
    write_peft_adapter(tmp_path / "other", CFG, rank=8, seed=5)
    assert engine.add_adapter_dir(root)["added"] == ["a"]  # header only: weights read at the first load
    os.replace(tmp_path / "other" / "adapter_model.safetensors", root / "a" / "adapter_model.safetensors")
    bad = engine.submit(PROMPTS[0], GREEDY, adapter="a")
    good = engine.submit(PROMPTS[1], GREEDY)
    engine.core.step()
    engine.core.wait_for_adapter("a")
    engine.core.run_until_idle()
    with pytest.raises(RequestFailed, match="changed since the adapter was registered"):
        bad.result(timeout=0)
    assert len(good.result(timeout=0).token_ids) == 6


def test_a_scan_skips_malformed_folders_and_registers_the_rest(engine, tmp_path):
    root = tmp_path / "adapters"
    for name, config in {
        "ok": {},
        "s": {"rank_pattern": "x"},
        "t": {"target_modules": [1]},
        "p": {"rank_pattern": {"(": 8}},
    }.items():
        path = write_peft_adapter(root / name, CFG, rank=8)
        (path / "adapter_config.json").write_text(
            json.dumps({**json.loads((path / "adapter_config.json").read_text()), **config})
        )
    result = engine.add_adapter_dir(root)
    assert result["added"] == ["ok"] and sorted(result["errors"]) == ["p", "s", "t"]
    assert all(str(tmp_path) not in why for why in result["errors"].values())


def test_a_non_streaming_client_that_leaves_frees_its_kv_blocks_within_a_step(tmp_path):
    """Over the real app and a real engine: the client disconnects while its request runs; at the
    engine's next step its KV blocks and slot are free (before: it ran to max_tokens)."""
    from asgi_helpers import call_app, until

    from serving.app import ServerState, build_app

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    engine = Engine.from_pretrained(
        str(gguf), warmup=False, start=False, max_model_len=128, num_kv_blocks=32, max_loras=0, cache_dir=str(tmp_path)
    )
    app = build_app(ServerState(engine, "tiny"))

    async def run():
        leave = asyncio.Event()
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 100, "ignore_eos": True}
        call = asyncio.create_task(call_app(app, body, leave=leave))
        await until(lambda: engine.core.has_work())
        for _ in range(3):
            engine.core.step()
        assert engine.stats()["running"] == 1 and engine.stats()["kv_blocks_used"] > 0
        leave.set()
        await call
        engine.core.step()  # the cancel is handled here
        stats = engine.stats()
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        assert app.state.admission.in_flight == 0

    try:
        asyncio.run(run())
    finally:
        engine.close()


@pytest.mark.slow
def test_a_script_that_never_closes_its_engine_exits_0(tmp_path):
    """Before: "FATAL: exception not rethrown" and SIGABRT at interpreter exit (2 runs of 3 here)."""
    script = (
        "import jax.numpy as jnp\n"
        "from plora_jax import Engine, SamplingParams\n"
        "from plora_jax.config import tiny\n"
        "from plora_jax.models.llama import init_params\n"
        "cfg = tiny()\n"
        "engine = Engine.from_params(cfg, init_params(cfg, jnp.float32, seed=0), warmup=False, max_model_len=64,\n"
        "                            num_kv_blocks=32, max_num_seqs=2, max_num_batched_tokens=32)\n"
        "print(len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].token_ids))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "3", run.stderr[-2000:]


def test_prompt_logprobs_in_chunks_equal_the_log_softmax_of_the_logits(tmp_path):
    """Echo's scoring: one loop call per chunk (here 64 tokens: 150 tokens in 3 calls), reduced
    on the device to [tokens, 20]; equal to the log-softmax of the full logits, on the base model
    and under an adapter, with every block and pin given back."""
    import jax

    engine = make_engine(policy="lru", max_num_batched_tokens=64)
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, 8))
    ids = [int(t) for t in np.random.default_rng(1).integers(1, CFG.vocab_size, 150)]
    calls = []
    call = engine.core.call
    engine.core.call = lambda fn, timeout=None: calls.append(fn) or call(fn, timeout)
    for adapter in (None, "a"):
        got = engine.prompt_logprobs(ids, adapter, temperature=0.7)
        ref = np.asarray(jax.nn.log_softmax(engine.logits(ids, adapter)[:-1] / 0.7, axis=-1))
        np.testing.assert_allclose(got.chosen, ref[np.arange(149), ids[1:]], atol=1e-4)
        np.testing.assert_array_equal(got.top_ids[:, 0], ref.argmax(-1))
        np.testing.assert_allclose(got.top[:, :5], -np.sort(-ref, axis=-1)[:, :5], atol=1e-4)
        stats = engine.stats(fresh=True)
        assert stats["kv_blocks_used"] == 0 and stats["adapters_pinned"] == 0
    assert len(calls) >= 2 * (1 + 3 + 1)  # per prompt: open, three chunks, close (and logits' own)
    engine.close()


def test_an_adapter_unloaded_while_a_prompt_is_scored_leaves_no_pin(tmp_path):
    """Echo's scoring holds an adapter pin across loop calls; an unload (and a load of the same
    name) in between retires the session's pin as it does a running request's: when the session
    closes, no pin is left and the new version's are untouched."""
    from plora_jax.engine import scoring

    engine = make_engine(policy="lru")
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "old", CFG, 8))
        session = engine.core.call(lambda: scoring.Scoring(engine.core, [PROMPTS[0]], ["a"]))
        assert engine.stats(fresh=True)["adapters_pinned"] == 1
        engine.remove_adapter("a")
        engine.add_adapter("a", write_peft_adapter(tmp_path / "new", CFG, 8, seed=4))
        with pytest.raises(RuntimeError, match="scoring"):
            engine.reset_adapters()
        handle = engine.submit(PROMPTS[1], GREEDY, adapter="a")  # the new version, pinned while it runs
        engine.core.step()
        engine.core.wait_for_adapter("a")
        engine.core.step()
        engine.core.call(session.close)
        stats = engine.stats(fresh=True)
        assert stats["adapters_pinned"] == 1  # the running request's pin on the new version, only
        engine.core.run_until_idle()
        assert len(handle.result(timeout=0).token_ids) == 6 and engine.stats(fresh=True)["adapters_pinned"] == 0
        engine.core.lora.check()
    finally:
        engine.close()


@pytest.mark.slow  # a real engine behind the whole app, compiled
def test_adapter_failures_over_http_are_400_or_500_and_never_show_a_path(tmp_path):
    """Through the real app and engine: malformed, poisoned, escaping and vanished adapters, and
    a dead engine, each answered with OpenAI's error JSON (400 naming lora_path for a bad
    folder, 500 for a load that failed later, 503 once the engine died), and no answer, /health
    included, holds an absolute path."""
    from fastapi.testclient import TestClient

    from serving.app import ServerState, build_app
    from serving.sources import AdapterSources

    gguf = tmp_path / "tiny.gguf"
    model_config, _ = write_tiny_gguf(gguf)
    root = tmp_path / "adapters"
    engine = Engine.from_pretrained(
        str(gguf), warmup=False, max_model_len=128, num_kv_blocks=32, host_cache_mb=0, cache_dir=str(tmp_path / "c")
    )

    def bad(name: str, **config) -> Path:
        path = write_peft_adapter(root / "bad" / name, model_config, 8)
        current = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**current, **config}))
        return path

    folders = {
        "missing": root / "bad" / "missing",
        "alpha": bad("alpha", lora_alpha=10**400),
        "pattern": bad("pattern", rank_pattern="x"),
        "regex": bad("regex", rank_pattern={"([a-z_.0-9]+)+z": 8}),
        "linked": bad("linked"),
    }
    (folders["linked"] / "adapter_model.safetensors").unlink()
    (folders["linked"] / "adapter_model.safetensors").symlink_to(bad("target") / "adapter_model.safetensors")
    answers = []
    try:
        with TestClient(build_app(ServerState(engine, "tiny", AdapterSources.of([str(root)])))) as client:
            for name, path in folders.items():
                r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
                assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (name, r.text)
                answers.append(r.text)
            gone = write_peft_adapter(root / "gone", model_config, 8)
            assert (
                client.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(gone)}).status_code
                == 200
            )
            answers.append(client.get("/v1/models").text)
            shutil.rmtree(gone)  # its weights are read again at its first load (no host cache)
            r = client.post("/v1/completions", json={"model": "gone", "prompt": "the cat", "max_tokens": 2})
            assert r.status_code == 500 and "could not be loaded" in r.json()["error"]["message"]
            answers.append(r.text)
            with contextlib.suppress(BaseException):
                engine.core.call(lambda: (_ for _ in ()).throw(SystemExit("injected device fault")))
            engine.core.died.wait(30)
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            answers += [r.text, health.text]
    finally:
        engine.close()
    for text in answers:
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, text


def test_a_cancelled_echo_stops_between_chunks_and_returns_everything(tmp_path):
    """prompt_logprobs with its cancel event set after the first chunk: it returns None at the
    next chunk boundary, and the session's KV blocks and adapter pin are back."""
    engine = make_engine(policy="lru", max_num_batched_tokens=64)
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, 8))
        cancel, chunks = threading.Event(), []
        call = engine.core.call

        def counting(fn, timeout=None):
            result = call(fn, timeout)
            if isinstance(result, list):  # a chunk's logprobs: the client leaves after the first
                chunks.append(result)
                cancel.set()
            return result

        engine.core.call = counting
        ids = [int(t) for t in np.random.default_rng(2).integers(1, CFG.vocab_size, 150)]  # 3 chunks of 64
        assert engine.prompt_logprobs(ids, "a", 0.0, cancel) is None
        assert len(chunks) == 1
        stats = engine.stats(fresh=True)
        assert stats["kv_blocks_used"] == 0 and stats["adapters_pinned"] == 0 and not engine.core.scoring
    finally:
        engine.close()


def test_concurrent_echoes_score_one_at_a_time():
    """Two prompt_logprobs calls at once (the loop on its own thread): each gets its own correct
    answer, and never more than one scoring session holds KV blocks at once."""
    from plora_jax.engine import scoring

    engine = make_engine(policy="lru", max_num_batched_tokens=64, start=True, max_loras=0)
    try:
        rng = np.random.default_rng(3)
        prompts = [[int(t) for t in rng.integers(1, CFG.vocab_size, 150)] for _ in range(2)]
        alone = [engine.prompt_logprobs(p).chosen for p in prompts]
        most, opened = [0], scoring.Scoring.__init__

        def tracking(self, core, *args):
            opened(self, core, *args)
            most[0] = max(most[0], len(core.scoring))

        scoring.Scoring.__init__ = tracking
        try:
            results = [None, None]
            threads = [
                threading.Thread(target=lambda i=i: results.__setitem__(i, engine.prompt_logprobs(prompts[i])))
                for i in range(2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        finally:
            scoring.Scoring.__init__ = opened
        assert most[0] == 1
        for got, want in zip(results, alone, strict=True):
            np.testing.assert_allclose(got.chosen, want, atol=1e-5)
        assert engine.stats(fresh=True)["kv_blocks_used"] == 0
    finally:
        engine.close()
