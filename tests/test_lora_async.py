"""Asynchronous adapter loads: the loop keeps stepping while a transfer is in flight, a copy
from the host cache is issued by the loop and committed at the first step boundary after it
lands, never behind a read from disk, a stale staged copy is never committed, and a load that
fails ends only the requests that needed it.

The engines here are built with start=False and driven with `engine.core.step()` on the test
thread; reads on the transfer thread are held on an explicit gate, and copies to the device
are made to land when the test says, so nothing depends on timing."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_peft_adapter

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.engine.outputs import RequestFailed
from plora_jax.lora import transfer
from plora_jax.models.llama import init_params

CFG = tiny()
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]


def make_engine(**overrides) -> Engine:
    params = init_params(CFG, jnp.float32, seed=3, scale=0.2)
    options = dict(
        warmup=False, max_model_len=512, max_num_seqs=4, num_kv_blocks=80, lora_pool_pages=40, page_rows=8, start=False
    )
    return Engine.from_params(CFG, params, **(options | overrides))


@pytest.fixture
def engine():
    engine = make_engine()
    yield engine
    engine.close()


def step_until(core, done, max_steps: int = 10_000) -> None:
    """Step the engine until `done()`; fail (never hang) if it takes more than `max_steps`."""
    for _ in range(max_steps):
        if done():
            return
        core.step()
    raise AssertionError(f"not done after {max_steps} steps")


class HeldTransfers:
    """Holds every read from disk on the transfer thread at a gate: `started` is set when the
    thread picks a read up, and it waits until `release()`. Drops the host copies of `names`
    first, so their loads read the folder. Records the engine's decode steps at the start of
    each read and at each commit."""

    def __init__(self, engine: Engine, *names: str):
        self.engine = engine
        self.started, self._gate = threading.Event(), threading.Event()
        self.handed_back = threading.Event()  # a read is back from the thread, for the loop to take
        self.steps_at_start: list[int] = []
        self.steps_at_commit: list[int] = []
        lora = engine.core.lora
        for name in names:
            engine.core.call(lambda name=name: lora.drop_host_copy(name))
        read, commit = lora._read, lora.commit

        def held_read(*args):
            self.steps_at_start.append(self.decode_steps())
            self.started.set()
            assert self._gate.wait(60), "the test never released the transfer"
            return read(*args)

        def recorded_commit(*args):
            self.steps_at_commit.append(self.decode_steps())
            return commit(*args)

        lora._read, lora.commit = held_read, recorded_commit
        wake = lora.transfer.on_done
        lora.transfer.on_done = lambda: (self.handed_back.set(), wake and wake())

    def decode_steps(self) -> int:
        return self.engine.core.snapshot.stats["decode_steps"]

    def release(self) -> None:
        self._gate.set()


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_running_request_advances_every_step_while_an_adapter_loads(engine, tmp_path):
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=32))
    held = HeldTransfers(engine, "a")
    base = engine.submit(PROMPT, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    core = engine.core
    for _ in range(3):
        core.step()
    lora = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0), adapter="a")
    core.step()  # admits nothing for "a" yet: its load starts on the transfer thread
    assert held.started.wait(60) and core.lora.is_loading("a")
    steps0 = held.decode_steps()
    for _ in range(10):  # the load is held open: every step still decodes the running request
        core.step()
    assert core.lora.is_loading("a") and held.decode_steps() == steps0 + 10
    held.release()
    core.wait_for_adapter("a")
    step_until(core, lambda: lora.finished)
    out = lora.result(timeout=0)
    assert len(out.token_ids) == 4 and out.metrics.cold_start and out.metrics.adapter_wait_s > 0
    assert held.steps_at_commit[0] >= held.steps_at_start[0] + 10, "the loop stalled during the load"
    base.cancel()
    core.run_until_idle()


def test_a_demand_load_from_the_host_cache_commits_at_the_first_boundary_after_it_lands(tmp_path, monkeypatch):
    """Issue 16's acceptance: with the adapter's copy in the host cache, the loop itself issues
    the copy to the device (no transfer thread), keeps stepping while it is in flight, and
    commits it at the first step boundary after it has landed, admitting the request there.
    (Without waiting for host copies at admission: the default's case is the next test.)"""
    engine = make_engine(wait_host_copies=False, policy="reactive")  # reactive: no prefetch on arrival
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=24))
    core, lora = engine.core, engine.core.lora
    assert lora.residency("a") == "host"
    landed = threading.Event()  # the copy counts as landed when the test says
    monkeypatch.setattr(transfer, "_landed", lambda staged: landed.is_set())
    base = engine.submit(PROMPT, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    core.step()
    request = engine.submit(PROMPT, SamplingParams(max_tokens=3, temperature=0), adapter="a")
    core.step()  # admission starts the load: the loop issues the copy at once
    assert lora.is_loading("a") and lora.transfer.landing and not lora.transfer.reading
    steps = core.snapshot.stats["decode_steps"]
    for _ in range(3):  # not landed: the loop steps on, the request waits
        core.step()
    assert lora.is_loading("a") and core.snapshot.stats["decode_steps"] == steps + 3
    assert any(r.request_id == request.request_id for r in core.scheduler.waiting)
    landed.set()
    core.step()  # the first boundary after it landed: committed, the request admitted
    assert lora.residency("a") == "device" and not lora.transfer.landing
    assert any(r.request_id == request.request_id for r in core.scheduler.running)
    step_until(core, lambda: request.finished)
    out = request.result(timeout=0)
    assert out.metrics.cold_start and len(out.token_ids) == 3
    assert (
        out.token_ids
        == engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0), adapters=["a"])[0].token_ids
    )
    base.cancel()
    core.run_until_idle()
    engine.close()


def test_by_default_a_copy_from_the_host_is_waited_for_and_joins_the_step_being_planned(tmp_path):
    engine = make_engine(policy="reactive")  # no prefetch on arrival: the request's own load
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=24))
    core = engine.core
    base = engine.submit(PROMPT, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    core.step()
    request = engine.submit(PROMPT, SamplingParams(max_tokens=3, temperature=0), adapter="a")
    core.step()  # admission issues the copy, waits the one copy, commits it and admits the request
    assert core.lora.residency("a") == "device"
    assert any(r.request_id == request.request_id for r in core.scheduler.running)
    stats = engine.stats()
    assert stats["sync_load_s"] > 0 and stats["stall_s"] > 0  # the running request waited the copy
    step_until(core, lambda: request.finished)
    assert request.result(timeout=0).metrics.cold_start
    base.cancel()
    core.run_until_idle()
    engine.close()


def test_a_copy_from_the_host_never_waits_behind_a_read_from_disk(engine, tmp_path):
    engine.add_adapter("cold", write_peft_adapter(tmp_path / "cold", CFG, rank=8))
    engine.add_adapter("warm", write_peft_adapter(tmp_path / "warm", CFG, rank=8, seed=4))
    held = HeldTransfers(engine, "cold")  # "cold" reads its folder, held on the thread
    core, lora = engine.core, engine.core.lora
    first = engine.submit(PROMPT, SamplingParams(max_tokens=2, temperature=0), adapter="cold")
    core.step()
    assert held.started.wait(60) and lora.is_loading("cold")
    second = engine.submit(PROMPT, SamplingParams(max_tokens=2, temperature=0), adapter="warm")
    step_until(core, lambda: second.finished)  # served while the read of "cold" is held
    assert lora.is_loading("cold") and not first.finished
    held.release()
    step_until(core, lambda: first.finished)
    assert len(first.result(timeout=0).token_ids) == 2


def test_stale_staged_copy_is_dropped(engine, tmp_path):
    """An adapter removed (its pages freed and reused) while its copy is in flight: the copy is
    dropped, and the adapter registered again gives the same output as before."""
    path = write_peft_adapter(tmp_path / "a", CFG, rank=24)
    other = write_peft_adapter(tmp_path / "b", CFG, rank=24, seed=9)
    engine.add_adapter("a", path)
    reference = engine.logits(PROMPT, adapter="a")
    engine.remove_adapter("a")
    engine.add_adapter("a", path)
    engine.add_adapter("b", other)
    held = HeldTransfers(engine, "a")
    lora = engine.core.lora
    engine.core.call(lambda: lora.start_load("a"))
    assert held.started.wait(60)
    engine.remove_adapter("a")  # its placement goes; "b" may take the same pages
    engine.add_adapter("a", path)
    held.release()
    assert held.handed_back.wait(60)
    engine.core.step()  # takes the read back and issues its (stale) copy
    engine.core.call(lora.transfer.wait_landing)
    engine.core.step()  # the copy has landed: handed back, and dropped as stale
    got_b = engine.logits(PROMPT, adapter="b")
    got_a = engine.logits(PROMPT, adapter="a")
    stats = engine.stats()
    assert stats["stale_dropped"] >= 1
    np.testing.assert_allclose(got_a, reference, atol=1e-5)
    assert np.abs(got_b - got_a).max() > 1e-3
    lora.pages.check()


def test_failed_load_fails_only_its_requests(engine, tmp_path):
    path = write_peft_adapter(tmp_path / "gone", CFG, rank=8)
    engine.add_adapter("gone", path)
    lora = engine.core.lora
    engine.core.call(lambda: lora.drop_host_copy("gone"))
    (path / "adapter_model.safetensors").write_bytes(b"corrupted after registration")
    bad = engine.submit(PROMPT, SamplingParams(max_tokens=4), adapter="gone")
    good = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0))
    engine.core.step()  # admits "good", starts the load of "gone"
    engine.core.wait_for_adapter("gone")  # the load fails: its request with it
    engine.core.run_until_idle()
    with pytest.raises(RequestFailed, match="could not be loaded"):
        bad.result(timeout=0)
    assert len(good.result(timeout=0).token_ids) == 4
    stats = engine.stats()
    assert stats["load_failures"] == 1 and stats["adapter_pages_used"] == 0 and stats["waiting"] == 0
    lora.pages.check()


def test_staging_through_pinned_host_memory_gives_the_same_weights(engine, tmp_path):
    """The GPU staging path (numpy -> pinned host -> device) runs on CPU too: same logits."""
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=24))
    engine.add_adapter("b", write_peft_adapter(tmp_path / "b", CFG, rank=24))  # same weights (seed 0)
    reference = engine.logits(PROMPT, adapter="a")
    engine.core.lora.stage_via_pinned = True
    np.testing.assert_allclose(engine.logits(PROMPT, adapter="b"), reference, atol=1e-6)


def test_sync_loads_stall_every_running_request_as_s_lora_does(tmp_path):
    """`adapter_loads="sync"` (the S-LoRA baseline): while an adapter loads, no step runs, so a
    running request gets no token until the load is committed."""
    engine = make_engine(adapter_loads="sync")
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=32))
        engine.add_adapter("bad", write_peft_adapter(tmp_path / "bad", CFG, rank=8))
        held = HeldTransfers(engine, "a")
        core = engine.core
        base = engine.submit(PROMPT, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        for _ in range(3):
            core.step()
        running = next(r for r in core.scheduler.running if r.request_id == base.request_id)  # we own the loop
        tokens_before = len(running.output_ids)
        lora = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0), adapter="a")
        # The next step blocks inside admission until the load is committed; release it from a
        # second thread once the transfer has started (explicit events, no timing).
        releaser = threading.Thread(target=lambda: held.started.wait(60) and held.release(), daemon=True)
        releaser.start()
        core.step()
        releaser.join()
        assert held.steps_at_commit == held.steps_at_start, "a step ran while the adapter loaded"
        assert len(running.output_ids) == tokens_before + 1  # only the token sampled before the load
        step_until(core, lambda: lora.finished)
        out = lora.result(timeout=0)
        assert len(out.token_ids) == 4 and out.metrics.cold_start and out.metrics.adapter_wait_s > 0
        # a synchronous load that fails ends only its request, and the engine keeps serving
        core.call(lambda: core.lora.drop_host_copy("bad"))
        (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"corrupted after registration")
        failing = engine.submit(PROMPT, SamplingParams(max_tokens=4), adapter="bad")
        held.release()
        step_until(core, lambda: failing.finished)
        with pytest.raises(RequestFailed, match="could not be loaded"):
            failing.result(timeout=0)
        assert not base.finished
        base.cancel()
        again = engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0), adapters=["a"])[0]
        assert not again.metrics.cold_start and engine.stats()["load_failures"] == 1
    finally:
        engine.close()


def test_an_explicit_prefetch_makes_the_first_request_a_device_hit(tmp_path):
    """`Engine.prefetch` (the cluster forecaster's pre-load): the adapter is on the device before
    any request names it, so its first request is not a cold start; the snapshot lists it on the
    host and on the device; an unknown name is refused."""
    engine = make_engine(policy="reactive")  # reactive: no prefetch of its own
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=16))
        core = engine.core
        assert engine.host_adapters() == {"a"} and engine.resident_adapters() == frozenset()
        assert engine.prefetch("a") in ("loading", "device")
        core.wait_for_adapter("a")
        core.step()
        assert engine.resident_adapters() == {"a"} and engine.prefetch("a") == "device"  # a second call is a no-op
        request = engine.submit(PROMPT, SamplingParams(max_tokens=2, temperature=0), adapter="a")
        step_until(core, lambda: request.finished)
        assert not request.result(timeout=0).metrics.cold_start
        assert core.snapshot.stats["prefetch_issued"] == 1
        with pytest.raises(ValueError, match="'nope' is not registered"):
            engine.prefetch("nope")
    finally:
        engine.close()


def test_a_prefetch_evicts_none_of_the_adapters_it_is_told_to_keep(tmp_path):
    """The forecaster passes the adapters it rates above the one it pre-loads: into a full pool
    the pre-load evicts only others, and does nothing when every resident is to be kept."""
    engine = make_engine(policy="reactive", max_loras=2)
    try:
        for name in "abc":
            engine.add_adapter(name, write_peft_adapter(tmp_path / name, CFG, rank=8))
        core = engine.core
        for name in "ab":
            engine.prefetch(name)
            core.wait_for_adapter(name)
        core.step()
        assert engine.resident_adapters() == {"a", "b"}
        assert engine.prefetch("c", keep=("a", "b")) == "host"  # no room without evicting a kept one
        core.step()
        assert engine.resident_adapters() == {"a", "b"}
        assert engine.prefetch("c", keep=("b",)) in ("loading", "device")  # "a", least recently used, goes
        core.wait_for_adapter("c")
        core.step()
        assert engine.resident_adapters() == {"b", "c"}
    finally:
        engine.close()
