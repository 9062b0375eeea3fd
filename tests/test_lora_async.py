"""Asynchronous adapter loads: the loop keeps stepping while a transfer is in flight, a stale
staged copy is never committed, and a load that fails ends only the requests that needed it."""

import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_peft_adapter

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.models.llama import init_params
from plora_jax.outputs import RequestFailed

CFG = tiny()
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]


@pytest.fixture
def engine():
    params = init_params(CFG, jnp.float32, seed=3, scale=0.2)
    engine = Engine.from_params(
        CFG, params, warmup=False, max_model_len=512, max_num_seqs=4, num_kv_blocks=80, lora_pool_pages=40, page_rows=8
    )
    yield engine
    engine.close()


def slow_transfers(engine, seconds: float, gate: threading.Event | None = None):
    """Make the transfer thread take `seconds` (or wait for `gate`) before staging each load."""
    manager = engine._lora
    stage = manager._stage

    def slow(*args):
        if gate is not None:
            gate.wait(30)
        else:
            time.sleep(seconds)
        return stage(*args)

    manager._stage = slow


def test_running_request_advances_every_step_while_an_adapter_loads(engine, tmp_path):
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=32))
    gate = threading.Event()
    slow_transfers(engine, 0, gate)
    base = engine.submit(PROMPT, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    seen = []
    counter = threading.Thread(target=lambda: seen.extend(base), daemon=True)
    counter.start()
    while len(seen) < 3:
        time.sleep(0.01)
    lora = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0), adapter="a")
    while not engine._lora.is_loading("a"):
        time.sleep(0.001)
    steps0, tokens0 = engine._steps, len(seen)
    time.sleep(0.5)  # the load is held open
    steps1, tokens1 = engine._steps, len(seen)
    assert engine._lora.is_loading("a")
    gate.set()
    out = lora.result(60)
    assert len(out.token_ids) == 4 and out.metrics.adapter_wait_s >= 0.5
    assert steps1 - steps0 >= 10, "the loop stalled during the load"
    assert tokens1 - tokens0 >= steps1 - steps0 - 2, "the running request missed steps during the load"
    base.cancel()


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
    gate = threading.Event()
    slow_transfers(engine, 0, gate)
    engine._call(lambda: engine._lora.start_load("a"))
    engine.remove_adapter("a")  # its placement goes; "b" may take the same pages
    engine.add_adapter("a", path)
    gate.set()
    got_b = engine.logits(PROMPT, adapter="b")
    got_a = engine.logits(PROMPT, adapter="a")
    stats = engine.stats()
    assert stats["stale_dropped"] >= 1
    np.testing.assert_allclose(got_a, reference, atol=1e-5)
    assert np.abs(got_b - got_a).max() > 1e-3
    engine._lora.pages.check()


def test_failed_load_fails_only_its_requests(engine, tmp_path):
    path = write_peft_adapter(tmp_path / "gone", CFG, rank=8)
    engine.add_adapter("gone", path)
    engine._call(lambda: setattr(engine._lora.entries["gone"], "a_pages", None))  # drop the host copy
    (path / "adapter_model.safetensors").write_bytes(b"corrupted after registration")
    bad = engine.submit(PROMPT, SamplingParams(max_tokens=4), adapter="gone")
    good = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(RequestFailed, match="could not be loaded"):
        bad.result(60)
    assert len(good.result(60).token_ids) == 4
    stats = engine.stats()
    assert stats["load_failures"] == 1 and stats["adapter_pages_used"] == 0 and stats["waiting"] == 0
    engine._lora.pages.check()


def test_staging_through_pinned_host_memory_gives_the_same_weights(engine, tmp_path):
    """The GPU staging path (numpy -> pinned host -> device) runs on CPU too: same logits."""
    engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=24))
    engine.add_adapter("b", write_peft_adapter(tmp_path / "b", CFG, rank=24))  # same weights (seed 0)
    reference = engine.logits(PROMPT, adapter="a")
    engine._lora.stage_via_pinned = True
    np.testing.assert_allclose(engine.logits(PROMPT, adapter="b"), reference, atol=1e-6)


def test_sync_loads_stall_every_running_request_as_s_lora_does(tmp_path):
    """`adapter_loads="sync"` (the S-LoRA baseline): while an adapter loads, no step runs, so a
    running request gets no token until the load is committed."""
    params = init_params(CFG, jnp.float32, seed=3, scale=0.2)
    engine = Engine.from_params(
        CFG, params, warmup=False, max_model_len=512, max_num_seqs=4, num_kv_blocks=80, lora_pool_pages=40,
        adapter_loads="sync",
    )  # fmt: skip
    try:
        engine.add_adapter("a", write_peft_adapter(tmp_path / "a", CFG, rank=32))
        engine.add_adapter("bad", write_peft_adapter(tmp_path / "bad", CFG, rank=8))
        gate = threading.Event()
        slow_transfers(engine, 0, gate)
        base = engine.submit(PROMPT, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        seen = []
        threading.Thread(target=lambda: seen.extend(base), daemon=True).start()
        while len(seen) < 3:
            time.sleep(0.01)
        lora = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0), adapter="a")
        while not engine._lora.is_loading("a"):
            time.sleep(0.001)
        time.sleep(0.05)  # a step already dispatched may still deliver its token
        steps0, tokens0 = engine._steps, len(seen)
        time.sleep(0.5)  # the load is held open
        assert engine._lora.is_loading("a")
        assert (engine._steps, len(seen)) == (steps0, tokens0), "a step ran while the adapter loaded"
        gate.set()
        out = lora.result(60)
        assert len(out.token_ids) == 4 and out.metrics.cold_start and out.metrics.adapter_wait_s >= 0.5
        # a synchronous load that fails ends only its request, and the engine keeps serving
        engine._call(lambda: setattr(engine._lora.entries["bad"], "a_pages", None))
        (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"corrupted after registration")
        with pytest.raises(RequestFailed, match="could not be loaded"):
            engine.submit(PROMPT, SamplingParams(max_tokens=4), adapter="bad").result(60)
        assert not base.finished
        base.cancel()
        again = engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0), adapters=["a"])[0]
        assert not again.metrics.cold_start and engine.stats()["load_failures"] == 1
    finally:
        engine.close()
