"""Tiers and prefetch on a tiny random model: the folder registry, the host cache's budget and
eviction, prefetch accounting, and fault injection (a predictor that raises, a load whose file
went away, an adapter removed or replaced while in use). Also the manager's invariants under random
arrivals, finishes, prefetches, evictions and failed loads (hypothesis)."""

import logging
import shutil
import time

import numpy as np
import pytest
from helpers import tiny_lora_engine, write_peft_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plora_jax import SamplingParams
from plora_jax.config import EngineConfig, tiny
from plora_jax.engine.outputs import RequestFailed
from plora_jax.lora.manager import LoraManager
from plora_jax.lora.peft import AdapterError
from plora_jax.policies import Decision, Oracle, Predictive

CFG = tiny()
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]
GREEDY = SamplingParams(max_tokens=4, temperature=0)


def make_engine(**overrides):
    return tiny_lora_engine(CFG, **overrides)


@pytest.fixture
def engine():
    engine = make_engine(policy="lru")
    yield engine
    engine.close()


def residency(engine, name: str) -> str:
    return {d["name"]: d["residency"] for d in engine.adapters()}[name]


def test_scan_registers_a_thousand_adapters_without_reading_weights(engine, tmp_path):
    root = tmp_path / "adapters"
    for i in range(1000):
        write_peft_adapter(root / f"fn{i:04d}", CFG, rank=8 * (1 + i % 4), seed=i)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "not-an-adapter").mkdir()
    result = engine.add_adapter_dir(root)
    assert len(result["added"]) == 1000 and list(result["errors"]) == ["broken"]
    assert "adapter_config.json" in result["errors"]["broken"]
    assert engine.add_adapter_dir(root)["added"] == []  # a rescan skips what is registered
    stats = engine.stats()
    assert stats["adapters_registered"] == 1000 and stats["adapters_on_host"] == 0
    listed = {a["name"]: a for a in engine.adapters()}
    assert listed["fn0003"]["rank"] == 32 and listed["fn0003"]["residency"] == "disk"
    # A scanned adapter serves the same logits as one read at registration.
    reference = engine.logits(PROMPT, adapter="fn0999")
    engine.add_adapter("copy", root / "fn0999")
    np.testing.assert_allclose(engine.logits(PROMPT, adapter="copy"), reference, atol=1e-5)
    assert engine.stats()["bytes_disk_to_host"] > 0
    with pytest.raises(AdapterError, match="not found"):
        engine.add_adapter_dir(tmp_path / "nowhere")


def test_a_scanned_symlink_must_resolve_inside_the_folder(engine, tmp_path):
    """One confinement rule, as the server's load_lora_adapter applies it: a subfolder that is a
    symlink to a folder elsewhere is refused, naming where it leads; one within is registered."""
    root, elsewhere = tmp_path / "adapters", tmp_path / "elsewhere"
    write_peft_adapter(root / "real", CFG, rank=8)
    write_peft_adapter(elsewhere / "outside", CFG, rank=8)
    (root / "escape").symlink_to(elsewhere / "outside", target_is_directory=True)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    result = engine.add_adapter_dir(root)
    assert sorted(result["added"]) == ["alias", "real"] and list(result["errors"]) == ["escape"]
    assert "outside the adapter folder" in result["errors"]["escape"] and "elsewhere" in result["errors"]["escape"]
    assert not engine.has_adapter("escape")


def test_host_cache_keeps_its_budget_and_evicts_least_recently_used(tmp_path):
    manager = LoraManager(CFG, EngineConfig(lora_pool_pages=40, host_cache_mb=1.0), np.float32)
    paths = [write_peft_adapter(tmp_path / f"a{i}", CFG, rank=64, seed=i) for i in range(4)]
    manager.add("a0", paths[0])
    one = manager.entries["a0"].host_bytes
    manager.host.budget = 2 * one + one // 2  # room for two copies
    for i in (1, 2):
        manager.add(f"a{i}", paths[i])
    assert [manager.residency(f"a{i}") for i in range(3)] == ["disk", "host", "host"]
    assert manager.stats()["host_evictions"] == 1 and manager.stats()["host_cache_bytes"] == 2 * one
    # Priorities from the policy decide which copy goes: a1 outranks a2 now.
    manager.apply(Decision(priority={"a1": 1.0}))
    manager.add("a3", paths[3])
    assert manager.residency("a1") == "host" and manager.residency("a2") == "disk"
    # A host prefetch reads a copy in when the budget allows it (by evicting a lower priority).
    pool = manager.zeros()
    manager.apply(Decision(host=["a0"], priority={"a0": 2.0, "a1": 1.0}))
    pool, _ = manager.poll(pool, block=True)  # waits for the read to finish
    assert manager.residency("a0") == "host" and manager.residency("a3") == "disk"
    assert manager.stats()["host_cache_bytes"] <= manager.host_budget
    manager.check()
    manager.close()


def test_zero_host_budget_reads_from_disk_at_each_load(tmp_path):
    engine = make_engine(policy="reactive", host_cache_mb=0.0)
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=16))
        assert engine.adapters()[0]["residency"] == "disk"
        first = engine.generate([PROMPT], GREEDY, adapters=["a"])[0]
        second = engine.generate([PROMPT], GREEDY, adapters=["a"])[0]
        assert first.token_ids == second.token_ids
        stats = engine.stats()
        # reactive frees the adapter when its request ends: two cold starts, both from disk.
        assert stats["cold_starts"] == 2 and stats["host_hits"] == 0 and stats["adapters_on_device"] == 0
        assert stats["bytes_disk_to_host"] == 2 * engine.adapters()[0]["bytes"]
    finally:
        engine.close()


def test_oracle_prefetch_turns_a_cold_start_into_a_device_hit(engine, tmp_path):
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=16))
    engine.add_adapter("b", write_peft_adapter(tmp_path / "b", CFG, rank=16, seed=1))
    reference = engine.logits(PROMPT, adapter="a")
    lora = engine.core.lora
    engine.core.call(lambda: lora.remove("a") or lora.add("a", tmp_path / "a"))  # off the device
    before = engine.stats()
    oracle = Oracle([(0.3, "a")], interval_s=3600.0, horizon_s=1.0)
    oracle.set_origin(time.monotonic() - 0.2)  # "a" arrives in 0.1 s: within the horizon now
    engine.set_policy(oracle)
    engine.core.step()  # the first decision is due at once: it prefetches "a"
    assert residency(engine, "a") == "loading"
    engine.core.wait_for_adapter("a")
    assert residency(engine, "a") == "device"
    out = engine.generate([PROMPT], GREEDY, adapters=["a"])[0]
    stats = engine.stats()
    delta = {k: stats[k] - before[k] for k in ("prefetch_issued", "prefetch_used", "cold_starts", "device_hits")}
    assert delta == {"prefetch_issued": 1, "prefetch_used": 1, "cold_starts": 0, "device_hits": 1}
    assert stats["prefetch_wasted"] == 0 and stats["policy"] == "oracle"
    assert out.metrics.adapter_wait_s == 0 and not out.metrics.cold_start
    np.testing.assert_allclose(engine.logits(PROMPT, adapter="a"), reference, atol=1e-5)


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_prefetched_but_unused_adapter_counts_as_wasted(tmp_path):
    forecaster = type("F", (), {"update": lambda self, c: None, "predict": lambda self: {"b": 0.9}})()
    engine = make_engine(policy="lru", max_loras=1)
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=16))
        engine.add_adapter("b", write_peft_adapter(tmp_path / "b", CFG, rank=16, seed=1))
        policy = Predictive(forecaster, interval_s=3600.0)  # its thread stays idle: the test runs it
        policy.step()  # one forecast: "b" is hot
        engine.set_policy(policy)
        engine.core.step()  # the first decision is due at once
        engine.core.wait_for_adapter("b")
        assert engine.stats()["prefetch_issued"] == 1 and residency(engine, "b") == "device"
        engine.generate([PROMPT], GREEDY, adapters=["a"])  # one slot: "a" displaces the unused "b"
        stats = engine.stats()
        assert stats["prefetch_wasted"] == 1 and stats["prefetch_used"] == 0 and stats["predictor_runs"] >= 1
    finally:
        engine.close()


def test_a_predictor_that_raises_falls_back_to_reactive_and_logs_once(tmp_path, caplog):
    class Broken:
        def update(self, counts):
            raise RuntimeError("forecaster exploded")

        def predict(self):
            return {}

        def forget(self, names):

            pass  # nothing kept per adapter

    engine = make_engine(policy="lru")
    try:
        for name in "ab":
            engine.add_adapter(name, write_peft_adapter(tmp_path / name, CFG, rank=8, seed=ord(name)))
        policy = Predictive(Broken(), interval_s=3600.0)
        for _ in range(3):  # three forecasts fail (run here, not on the policy's timer)
            with pytest.raises(RuntimeError, match="exploded"):
                policy.step()
        engine.set_policy(policy)
        with caplog.at_level(logging.WARNING, logger="plora_jax.engine"):
            outs = engine.generate([PROMPT] * 6, GREEDY, adapters=["a", "b", None, "a", "b", "a"])
        assert all(len(o.token_ids) == 4 for o in outs)
        stats = engine.stats()
        assert stats["predictor_failures"] == 3
        assert stats["policy_fallbacks"] >= 3 and stats["prefetch_issued"] == 0 and stats["waiting"] == 0
        warnings = [r for r in caplog.records if "falling back to reactive" in r.getMessage()]
        assert len(warnings) == 1 and "forecaster exploded" in warnings[0].getMessage()
        engine.core.lora.check()
    finally:
        engine.close()


def test_the_reactive_fallback_frees_adapters_and_the_policy_resumes(tmp_path):
    class Flaky:
        down = True

        def update(self, counts):
            if self.down:
                raise RuntimeError("forecaster down")

        def predict(self):
            return {"b": 0.9}

        def forget(self, names):

            pass  # nothing kept per adapter

    forecaster = Flaky()
    engine = make_engine(policy="lru")
    try:
        for name in "ab":
            engine.add_adapter(name, write_peft_adapter(tmp_path / name, CFG, rank=8, seed=ord(name)))
        policy = Predictive(forecaster, interval_s=3600.0)  # forecasts run here, not on its timer
        with pytest.raises(RuntimeError, match="down"):
            policy.step()
        engine.set_policy(policy)
        engine.generate([PROMPT], GREEDY, adapters=["a"])
        # Reactive while the forecaster is down: "a" left the device when its last request ended.
        assert residency(engine, "a") != "device" and engine.core.lora.pages.get("a") is None
        assert engine.stats()["policy_fallbacks"] >= 1 and engine.stats()["prefetch_issued"] == 0
        forecaster.down = False
        policy.step()  # forecasts return
        engine.generate([PROMPT], GREEDY, adapters=["a"])  # its arrival asks the policy again
        engine.core.wait_for_adapter("b")
        # The policy is back: "b" was prefetched, and "a" stays after its request (not reactive).
        assert residency(engine, "b") == "device" and residency(engine, "a") == "device"
        assert engine.stats()["prefetch_issued"] >= 1  # "b" (and "a", queued when the policy ran)
        engine.core.lora.check()
    finally:
        engine.close()


def test_a_load_whose_folder_was_removed_fails_only_its_requests(engine, tmp_path):
    root = tmp_path / "adapters"
    write_peft_adapter(root / "gone", CFG, rank=8)
    engine.add_adapter_dir(root)  # registered from the header only: no host copy
    shutil.rmtree(root / "gone")
    bad = engine.submit(PROMPT, GREEDY, adapter="gone")
    good = engine.submit(PROMPT, GREEDY)
    engine.core.step()  # starts the load of "gone"
    engine.core.wait_for_adapter("gone")  # it fails, and its request with it
    engine.core.run_until_idle()
    with pytest.raises(RequestFailed, match="could not be loaded"):
        bad.result(timeout=0)
    assert len(good.result(timeout=0).token_ids) == 4
    stats = engine.stats()
    assert stats["load_failures"] == 1 and stats["adapter_pages_used"] == 0 and stats["waiting"] == 0
    engine.core.lora.check()


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_an_adapter_removed_while_in_use(tmp_path):
    """The running request finishes; the waiting one fails naming the adapter; the name is gone
    for new requests; nothing leaks once the running one ends."""
    engine = make_engine(policy="lru", max_num_seqs=1)
    try:
        path = write_peft_adapter(tmp_path / "a", CFG, rank=16)
        engine.add_adapter("a", path)
        running = engine.submit(PROMPT, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), adapter="a")
        engine.core.step()
        engine.core.wait_for_adapter("a")
        while not engine.stats()["running"]:
            engine.core.step()
        waiting = engine.submit(PROMPT, GREEDY, adapter="a")  # one decode row: it waits
        engine.core.step()
        engine.remove_adapter("a")
        assert waiting.finished
        with pytest.raises(RequestFailed, match="'a' was removed"):
            waiting.result(timeout=0)
        with pytest.raises(ValueError, match="no adapter with this name"):
            engine.submit(PROMPT, GREEDY, adapter="a")
        assert engine.stats()["adapter_pages_used"] > 0  # the running request still reads them
        engine.core.run_until_idle()
        assert len(running.result(timeout=0).token_ids) == 60
        stats = engine.stats()
        assert stats["running"] == 0
        assert stats["adapter_pages_used"] == 0 and stats["adapters_on_device"] == 0 and stats["kv_blocks_used"] == 0
        engine.add_adapter("a", path)
        assert len(engine.generate([PROMPT], GREEDY, adapters=["a"])[0].token_ids) == 4
        engine.core.lora.check()
    finally:
        engine.close()


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_replacing_an_adapter_while_its_old_version_runs(tmp_path):
    """vLLM's unload-then-load of one name: the load succeeds at once; the running request
    finishes on the old weights, the next one uses the new; the old pages are freed when the
    old request ends (no leak, no window in which the name is missing)."""
    engine = make_engine(policy="lru", max_num_seqs=2)
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    try:
        old, new = (write_peft_adapter(tmp_path / n, CFG, rank=16, seed=s) for n, s in (("old", 1), ("new", 2)))
        engine.add_adapter("ref-old", old)
        engine.add_adapter("ref-new", new)
        want_old, want_new = (o.token_ids for o in engine.generate([PROMPT] * 2, long, adapters=["ref-old", "ref-new"]))
        assert want_old != want_new  # the two versions are told apart
        engine.remove_adapter("ref-old")
        engine.remove_adapter("ref-new")
        engine.core.run_until_idle()

        engine.add_adapter("a", old)
        running = engine.submit(PROMPT, long, adapter="a")
        while not engine.stats()["running"]:
            engine.core.step()
        engine.core.step()  # a few tokens on the old version
        engine.remove_adapter("a")
        engine.add_adapter("a", new)  # at once, while the old version runs
        assert engine.has_adapter("a")
        assert engine.stats()["adapters_retiring"] == 1 and engine.stats()["adapters_on_device"] == 0
        following = engine.submit(PROMPT, long, adapter="a")
        engine.core.run_until_idle()
        assert running.result(timeout=0).token_ids == want_old
        assert following.result(timeout=0).token_ids == want_new
        stats = engine.stats()
        assert stats["running"] == 0 and stats["kv_blocks_used"] == 0
        assert stats["adapters_on_device"] == 1 and stats["adapters_retiring"] == 0  # the old pages are free
        assert stats["adapter_pages_used"] == engine.adapters()[0]["num_pages"]
        engine.core.lora.check()
    finally:
        engine.close()


# --- manager invariants under random operations ------------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "finish", "prefetch", "evict", "fail", "poll"]),
        st.integers(0, 7),
        st.floats(0, 2),
    ),
    max_size=60,
)


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-ops")
    return [write_peft_adapter(root / f"a{i}", CFG, rank=8 * (1 + i % 4), seed=i) for i in range(8)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, layout=st.sampled_from(["paged", "contiguous"]))
def test_manager_invariants_under_random_operations(adapter_paths, tmp_path, ops, layout):
    """Page 0 never handed out, no page owned twice, pinned adapters never evicted, free + used =
    total, host cache within accounting; at the end every load drains and every pin returns."""
    config = EngineConfig(lora_pool_pages=17, max_loras=4, max_lora_rank=32, layout=layout, host_cache_mb=0.05)
    manager = LoraManager(CFG, config, np.float32)
    pool = manager.zeros()
    for i, path in enumerate(adapter_paths):
        manager.add(f"a{i}", path, read=i % 2 == 0)
    held: dict[str, int] = {}  # pins held by "requests"
    try:
        for op, key, priority in ops:
            name = f"a{key}"
            if op == "arrive":
                if manager.acquire(name) is not None:
                    held[name] = held.get(name, 0) + 1
            elif op == "finish" and held.get(name):
                manager.release(name)
                held[name] -= 1
            elif op == "prefetch":
                manager.apply(Decision(device=[name], host=[name], priority={name: priority}))
            elif op == "evict":
                manager.apply(Decision(evict=[name]))
            elif op == "fail" and name not in manager.loading and name not in manager.host_jobs:
                manager.drop_host_copy(name)
                manager.entries[name].path = tmp_path / "missing"  # the next read fails
            elif op == "poll":
                pool, _ = manager.poll(pool, block=True)
            manager.check()
            for n, count in held.items():
                if count:
                    assert manager.pages.get(n) is not None and manager.pages.get(n).pins >= count, n
        for name, count in held.items():
            for _ in range(count):
                manager.release(name)
        while manager.loading or manager.host_jobs:
            pool, _ = manager.poll(pool, block=True)
        manager.check()
        assert all(r.pins == 0 for r in manager.pages.resident.values())
    finally:
        manager.close()


def test_default_policy_runs_the_shipped_lstm(tmp_path):
    engine = make_engine()  # policy "predictive" with the shipped checkpoint
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=8))
        policy = engine.policy
        for _ in range(3):
            engine.generate([PROMPT], GREEDY, adapters=["a"])
            policy.step()  # one forecast per interval (run here rather than on its timer)
        stats = engine.stats()
        assert stats["policy"] == "predictive" and stats["policy_fallbacks"] == 0
        assert policy.stats()["predictor_runs"] == 3
        assert type(policy.forecaster).__name__ == "LstmForecaster"
        assert 0.0 < policy.forecaster.predict()["a"] < 1.0
    finally:
        engine.close()


def test_one_memory_budget_an_unused_adapter_gives_its_blocks_to_the_kv_cache(tmp_path):
    """adapter_memory="unified": a rank-8 adapter page (64 KiB here) is worth 8 KV blocks (8 KiB).
    With 16 usable blocks, the adapter kept resident by lru leaves 8; two base-model requests of
    5 blocks each need 10, so the second one's admission evicts the adapter for its blocks, and
    the adapter's next request reloads it and generates the same tokens."""
    engine = make_engine(policy="lru", adapter_memory="unified", max_lora_rank=8, max_model_len=128, num_kv_blocks=17)
    try:
        write_peft_adapter(tmp_path / "a", CFG, rank=8, seed=1)
        engine.add_adapter("a", tmp_path / "a")
        first = engine.generate([PROMPT], GREEDY, adapters=["a"])[0]
        stats = engine.stats()
        assert stats["adapter_kv_blocks"] == stats["kv_blocks_used"] == 8 and residency(engine, "a") == "device"
        long = [list(range(1, 71)), list(range(2, 72))]  # 70 + 4 tokens: 5 blocks each
        engine.generate(long, GREEDY)
        stats = engine.stats()
        assert stats["kv_reclaims"] == 1 and stats["adapter_kv_blocks"] == 0 and residency(engine, "a") != "device"
        assert engine.generate([PROMPT], GREEDY, adapters=["a"])[0].token_ids == first.token_ids
        # S-LoRA's policy makes the engine's loads synchronous whatever adapter_loads says
        assert not engine.core.gate.sync
        engine.set_policy("slora")
        assert engine.core.gate.sync
        assert engine.generate([PROMPT], GREEDY, adapters=["a"])[0].token_ids == first.token_ids
        assert engine.stats()["adapter_kv_blocks"] == 0  # freed once unused
    finally:
        engine.close()
    with pytest.raises(ValueError, match="beside its adapter's 8"):
        make_engine(adapter_memory="unified", max_lora_rank=8, max_model_len=128, num_kv_blocks=16)
