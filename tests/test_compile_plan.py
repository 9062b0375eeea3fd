"""The compile plan: progressive readiness, the on-disk executable cache (a cache for another
configuration or a corrupted file is ignored with a warning; that a restart in a fresh process
compiles nothing is checked with the shared cache, in test_shared_cache.py), the stats
snapshot under concurrent readers, /health while warming, and the rule that benchmarks use
public APIs only."""

import json
import logging
import re
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_peft_adapter

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.engine.compile_plan import CompilePlan
from plora_jax.metrics import RESIDENCIES
from plora_jax.models.llama import init_params

CFG = tiny()
PARAMS = init_params(CFG, jnp.float32, seed=3, scale=0.1)
OPTIONS = dict(max_model_len=96, num_kv_blocks=40, block_size=8, max_num_seqs=4, max_num_batched_tokens=32)


def make_engine(cache: Path, **overrides) -> Engine:
    return Engine.from_params(CFG, PARAMS, cache_dir=str(cache), max_loras=0, **(OPTIONS | overrides))


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_a_corrupted_cache_file_is_recompiled_with_a_warning(tmp_path, caplog):
    with make_engine(tmp_path) as engine:
        engine.runner.plan.complete.wait()
        reference = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
        folder = engine.runner.plan.cache.dir
    victim = sorted(folder.glob("decode-*.xexe"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING), make_engine(tmp_path) as engine:
        engine.runner.plan.complete.wait()
        stats = engine.stats()
        assert stats["compiled"] == 1 and stats["loaded"] == stats["executables"] - 1
        assert engine.generate([[4, 5, 6]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids == reference
    assert any("does not load" in r.getMessage() and victim.name in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_cache_made_for_another_configuration_is_ignored_with_a_warning(tmp_path, caplog):
    with make_engine(tmp_path / "a") as engine:
        engine.runner.plan.complete.wait()
        source = engine.runner.plan.cache.dir
        reference = engine.generate([[1, 2]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    # Another engine configuration: its executables have other names (their argument shapes
    # are part of the name), so none of config a's files is ever loaded for it.
    with make_engine(tmp_path / "b", max_num_seqs=2) as engine:
        engine.runner.plan.complete.wait()
        target = engine.runner.plan.cache.dir
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    with make_engine(tmp_path / "b", max_num_seqs=2) as engine:
        engine.runner.plan.complete.wait()
        stats = engine.stats()
        assert stats["compiled"] == 0 and stats["loaded"] == stats["executables"]  # its own files, only
        assert len(engine.generate([[1, 2]], SamplingParams(max_tokens=3))[0].token_ids) == 3
    # A cache written by another environment (here: another jax) under the same key: the
    # manifest disagrees, so the folder is ignored with a warning and rebuilt.
    manifest = source / "manifest.json"
    fingerprint = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**fingerprint, "jax": "0.0.0"}))
    with caplog.at_level(logging.WARNING), make_engine(tmp_path / "a") as engine:
        engine.runner.plan.complete.wait()
        stats = engine.stats()
        assert stats["loaded"] == 0 and stats["compiled"] == stats["executables"]
        assert engine.generate([[1, 2]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids == reference
    assert any("made for another configuration" in r.getMessage() for r in caplog.records)
    assert json.loads(manifest.read_text()) == fingerprint  # rewritten for this environment


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_readiness_is_progressive_and_smaller_steps_pad_into_ready_sizes(tmp_path, monkeypatch):
    """Until the minimal set (the largest size of each kind) is built the engine reports
    "warming" and /health answers 503; a step then pads up into the sizes already built."""
    from starlette.testclient import TestClient

    from serving.app import ServerState, build_app

    gate, warm = threading.Event(), CompilePlan.warm

    def held_warm(self):
        assert gate.wait(120)
        warm(self)

    monkeypatch.setattr(CompilePlan, "warm", held_warm)
    engine = make_engine(tmp_path, wait_ready=False)
    try:
        plan = engine.runner.plan
        order = plan.warm_order()
        assert order[:2] == [("decode", 4), ("prefill", 32)]  # the minimal set comes first
        readiness = engine.readiness()
        assert readiness == {"status": "warming", "compiled": 0, "total": len(order)}
        with TestClient(build_app(ServerState(engine, "tiny"))) as http:
            response = http.get("/health")
            assert response.status_code == 503 and response.json()["status"] == "warming"
            early = engine.submit([1, 2, 3], SamplingParams(max_tokens=3))  # waits for the first step
            gate.set()
            assert engine.wait_ready(120)
            assert http.get("/health").status_code == 200
            assert len(early.result(120).token_ids) == 3
        plan.complete.wait()
        assert plan.pick("decode", 1, lazy=False)[0] == 1 and engine.readiness()["compiled"] == len(order)
    finally:
        gate.set()
        engine.close()


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_stats_from_four_threads_while_adapters_churn(tmp_path):
    """stats() reads the published snapshot: four threads hammering it while requests with
    adapters run, load, evict and are removed raise nothing and always see whole snapshots."""
    engine = Engine.from_params(
        CFG, PARAMS, cache_dir=str(tmp_path), warmup=False, max_loras=2, lora_pool_pages=12, policy="lru", **OPTIONS
    )
    names = [f"a{i}" for i in range(5)]
    for i, name in enumerate(names):
        engine.add_adapter(name, write_peft_adapter(tmp_path / name, CFG, rank=8 * (1 + i % 2), seed=i))
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        try:
            while not stop.is_set():
                stats = engine.stats()
                assert stats["adapters_registered"] >= 0 and stats["kv_blocks_used"] >= 0
                assert sum(stats[f"adapters_tier_{t}"] for t in RESIDENCIES) == stats["adapters_registered"]
                reads[0] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        rng = np.random.default_rng(0)
        for round_ in range(6):
            adapters = [names[int(i)] for i in rng.integers(0, len(names), size=6)]
            prompts = [rng.integers(1, 256, size=int(rng.integers(2, 30))).tolist() for _ in adapters]
            outs = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), adapters=adapters)
            assert all(len(o.token_ids) == 4 for o in outs)
            gone = names[round_ % len(names)]
            engine.remove_adapter(gone)
            engine.add_adapter(gone, tmp_path / gone)
    finally:
        stop.set()
        for t in threads:
            t.join()
        engine.close()
    assert not errors, errors[0]
    assert reads[0] > 100


def test_benchmarks_use_public_apis_only():
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    private = re.compile(r"\b(engine|runner|core|lora|manager|plan)\._[a-z]")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(root.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line) or "engine._" in line
    ]
    assert not offenders, offenders
