"""One device-memory budget for the KV cache and the adapter pool (S-LoRA's unified pool), the
S-LoRA baselines that run on it, and the two oracles: hand-checked on the page pool, the
scheduler and the simulator."""

import dataclasses

import numpy as np
import pytest
from test_policies import view
from test_replay import CAL as HAND_COSTS

from plora_jax.config import EngineConfig
from plora_jax.engine.kv_blocks import BlockAllocator, check_capacity
from plora_jax.lora import KvShare, PagePool
from plora_jax.policies import POLICIES, CausalOracle, Oracle, adapter_loads
from plora_jax.serverless.sim import SimConfig, Simulator, simulate
from plora_jax.serverless.workload import TraceRequest, Workload, WorkloadConfig, workload_policy

# An adapter page is 1,000 bytes and a KV block 400 (16 tokens of 25 bytes): a one-page
# adapter takes 3 blocks.
PAGE, BLOCK = 1000, 400


def pool(num_blocks=10, num_pages=9, layout="paged", max_pages=2):
    blocks = BlockAllocator(num_blocks)
    return PagePool(num_pages, 5, max_pages, layout, KvShare(blocks, PAGE, BLOCK)), blocks


def test_a_resident_adapter_holds_the_kv_blocks_its_pages_are_worth():
    pages, blocks = pool()
    # 9 free blocks of 400 bytes are worth 3 pages of 1,000: the pool's 8 pages do not bind
    assert blocks.num_free == 9 and pages.capacity_pages == 3
    res, _ = pages.allocate("a", 2, 1500)  # 2 pages = 2,000 bytes = 5 blocks
    assert len(res.blocks) == 5 and blocks.num_free == 4 and pages.kv_blocks_held == 5
    assert pages.capacity_pages == 3  # a's 5 blocks count: they are the adapters'
    assert pages.allocate("b", 2, 1500)[1] == ["a"]  # 4 free blocks are short of 5: b evicts a
    pages.check()
    assert blocks.num_free == 4 and list(pages.resident) == ["b"] and pages.evictions == 1
    pages.pin("b")
    assert pages.allocate("c", 2, 1500) is None  # b is pinned and 4 blocks are short of 5
    pages.unpin("b")
    pages.evict("b")
    assert blocks.num_free == 9
    pages.check()


def test_a_contiguous_slot_pays_for_its_whole_region():
    pages, blocks = pool(num_pages=9, layout="contiguous", max_pages=2)
    res, _ = pages.allocate("a", 1, 500)  # rank 8 in a region of 2 pages: 5 blocks
    assert len(res.pages) == 2 and len(res.blocks) == 5 and blocks.num_free == 4
    pages.check()


def test_reclaim_evicts_unpinned_adapters_only_when_that_frees_enough():
    pages, blocks = pool(num_blocks=12)
    pages.allocate("a", 1, 500)  # 3 blocks
    pages.allocate("b", 1, 500)  # 3 blocks
    pages.pin("b")
    assert blocks.num_free == 5
    assert pages.reclaim(9) == []  # a's 3 would make 8 of 9: nothing evicted for nothing
    assert pages.get("a") is not None
    assert pages.reclaim(8) == ["a"] and blocks.num_free == 8
    assert pages.reclaim(2) == []  # already free
    pages.check()
    separate = PagePool(9, 5, 2)
    separate.allocate("a", 1, 500)
    assert separate.reclaim(1) == [] and separate.get("a") is not None  # no shared budget: nothing to give


def test_check_capacity_counts_the_adapter_beside_the_longest_sequence():
    check_capacity(8, 16, 64, adapter_blocks=3)  # 4 + 3 blocks of 7
    with pytest.raises(ValueError, match="beside its adapter's 4"):
        check_capacity(8, 16, 64, adapter_blocks=4)


# --- the simulator on one budget -----------------------------------------------------------
# test_replay's hand-made costs (three adapters of rank 8, one page of 1,000 bytes; a step 1 s,
# a load 2 s) and a KV token of 25 bytes: a block of 16 tokens is 400 bytes, a page 3 blocks.
CAL = dataclasses.replace(HAND_COSTS, kv_bytes_per_token=25)


def sim_config(num_kv_blocks=1024, max_model_len=4096, memory="unified", max_num_seqs=4, **kw):
    engine = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_loras=4,
        lora_pool_pages=3,
        page_rows=8,
        max_lora_rank=8,
        num_kv_blocks=num_kv_blocks,
        max_model_len=max_model_len,
        adapter_memory=memory,
    )
    return SimConfig(engine=engine, **kw)


def workload(rows, seconds_per_minute=100.0):
    """`rows`: (arrival, adapter, prompt tokens, output tokens)."""
    config = WorkloadConfig(trace="", llm_trace="", adapters=3, minutes=1, seconds_per_minute=seconds_per_minute)
    requests = [TraceRequest(t, a, p, o, 0) for t, a, p, o in rows]
    return Workload(config, {"A": 8, "B": 8, "C": 8}, requests, np.zeros((3, 1), np.int64))


def run(rows, policy, config):
    w = workload(rows)
    sim = None
    factory = lambda: workload_policy(policy, w, 100.0, lambda: sim.now)
    sim = Simulator(w, factory, config, CAL, interval_s=100.0)
    sim.run()
    for engine in sim.engines:  # every KV block is free, a request's, or an adapter's
        blocks = engine.scheduler.blocks
        held = sum(len(r.blocks) for r in engine.scheduler.running) + engine.pages.kv_blocks_held
        assert blocks.num_free + held == blocks.num_blocks - 1
    return sim


def test_an_adapter_kept_resident_is_kv_the_engine_does_not_have():
    rows = [(0.0, "A", 4, 1), (10.0, "B", 4, 1)]
    kept = run(rows, "lru", sim_config())
    engine = kept.engines[0]
    assert set(engine.pages.resident) == {"A", "B"}
    assert engine.scheduler.blocks.num_free == 1023 - 2 * 3  # each one-page adapter holds 3 blocks
    freed = run(rows, "reactive", sim_config())  # freed as its request ends: every block back
    assert not freed.engines[0].pages.resident and freed.engines[0].scheduler.blocks.num_free == 1023
    separate = run(rows, "lru", sim_config(memory="separate"))  # a pool of its own: KV untouched
    assert separate.engines[0].scheduler.blocks.num_free == 1023


def test_a_request_short_of_blocks_takes_them_from_an_unused_adapter():
    # 7 usable blocks. A's request (1 block) ends and A stays (lru): 3 blocks. B's adapter takes
    # 3 more; its 60-token prompt and 1 output need 4 blocks of 16, only 1 is free: the
    # scheduler reclaims A's 3 and B runs. A later request for A is cold again.
    config = sim_config(num_kv_blocks=8, max_model_len=64)
    sim = run([(0.0, "A", 4, 1), (10.0, "B", 60, 1), (20.0, "A", 4, 1)], "lru", config)
    counters = sim.counters()
    assert counters["kv_reclaims"] == 1 and counters["cold_starts"] == 3
    assert [r.finished is not None for r in sim.records()] == [True, True, True]
    # the same with a separate pool: nothing to reclaim, and A's second request hits
    sim = run([(0.0, "A", 4, 1), (10.0, "B", 60, 1), (20.0, "A", 4, 1)], "lru", sim_config(8, 64, "separate"))
    assert sim.counters()["kv_reclaims"] == 0 and sim.counters()["cold_starts"] == 2
    with pytest.raises(ValueError, match="beside its adapter's 3"):
        run([], "lru", sim_config(num_kv_blocks=7, max_model_len=64))


def test_slora_frees_down_to_the_running_batch_and_loads_synchronously():
    # A decodes 6 tokens from 0; B arrives at 0.5 and finishes in one step; B again at 20.
    # slora (sync loads): A loads 0-2 and prefills 2-3; B's 2 s load stalls A's decode, B is
    # freed as soon as it ends while A (still running) stays; at 20 B is cold again. lru keeps B.
    rows = [(0.0, "A", 4, 6), (0.5, "B", 4, 1), (20.0, "B", 4, 1)]
    slora = run(rows, "slora", sim_config())
    assert [r.cold for r in slora.records()] == [True, True, True]
    assert not slora.engines[0].pages.resident  # everything freed once idle
    assert slora.engines[0].gate.sync and slora.result().summary["stall_s"] == pytest.approx(2.0)
    assert [r.cold for r in run(rows, "lru", sim_config()).records()] == [True, True, False]
    assert adapter_loads("slora") == adapter_loads("slora_prefetch") == adapter_loads("reactive_sync") == "sync"
    assert adapter_loads("lru") == "async"


def test_slora_reads_every_adapter_into_host_memory():
    sim = run([(0.0, "A", 4, 1)], "slora", sim_config())
    assert set(sim.engines[0].core.host.copies) == {"A", "B", "C"}


def test_slora_prefetch_loads_a_queued_requests_adapter_before_its_admission():
    # One decode row: B (0.5) queues behind A, which decodes until 9. slora loads B at its
    # admission, synchronously; slora_prefetch loads it while B waits, so B's admission waits
    # on nothing and its first token comes 2 s sooner.
    rows, config = [(0.0, "A", 4, 6), (0.5, "B", 4, 1)], sim_config(max_num_seqs=1)
    slora, ahead = run(rows, "slora", config), run(rows, "slora_prefetch", config)
    # slora waits on both loads; slora_prefetch on A's alone (in flight when A is admitted at 0)
    assert slora.engines[0].gate.sync_waits == 2 and ahead.engines[0].gate.sync_waits == 1
    assert ahead.counters()["prefetch_issued"] == 2  # A's and B's, each as its request queued
    b_slora, b_ahead = slora.records()[1], ahead.records()[1]
    assert b_slora.first_token - b_ahead.first_token == pytest.approx(2.0)


def test_the_causal_oracle_never_holds_an_adapter_before_its_first_arrival():
    arrivals = [(10.0, "A"), (20.0, "B"), (30.0, "A"), (40.0, "C"), (50.0, "B")]
    policy = CausalOracle(arrivals, interval_s=100.0)
    policy.set_origin(0.0)
    for now in (0.0, 9.9, 10.0, 19.9, 20.0, 39.0, 40.0):
        d = policy.decide(view(now=now, names="ABC", device_bytes=300, host_bytes=300, disk_bytes=300))
        seen = {a for t, a in arrivals if t <= now}
        assert set(d.device + d.host + d.disk + list(d.priority)) <= seen, now
    # Simulated: the oracle prefetches A, B and C ahead of their first requests; the causal
    # oracle cannot, so each first request is a cold start, and then it keeps them.
    rows = [(t, a, 4, 1) for t, a in arrivals]
    assert run(rows, "oracle", sim_config()).counters()["cold_starts"] == 0
    causal = run(rows, "causal_oracle", sim_config())
    assert [r.cold for r in causal.records()] == [True, True, False, True, False]


def test_the_oracle_ranks_queued_adapters_by_their_place_in_the_queue():
    policy = Oracle([(5.0, "d"), (100.0, "b")], interval_s=10.0)
    d = policy.decide(view(now=0.0, queued="cacb", names="abcd", device_bytes=200))
    # used next: c, a, b (queue order), then d (arriving at 5 s): c and a fit
    assert d.priority == {"c": 4.0, "a": 3.0, "b": 2.0, "d": 1.0} and d.device == ["c", "a"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_next_use_oracle_is_never_worse_than_a_causal_policy_without_queueing(seed):
    # Requests 10 s apart, each done 3 s after it arrives at worst (2 s load, 1 s step): no queue.
    rng = np.random.default_rng(seed)
    rows = [(10.0 * i, str(rng.choice(["A", "B", "C"], p=[0.5, 0.3, 0.2])), 4, 1) for i in range(30)]
    w = workload(rows, seconds_per_minute=60.0)
    config = sim_config()
    cold = {
        p: simulate(w, p, config, CAL).summary["cold_starts"]
        for p in POLICIES
        if p not in ("predictive",)  # its LSTM: the ewma forecaster below instead
    }
    cold["predictive"] = simulate(w, "predictive", config, CAL, predictor_checkpoint="ewma").summary["cold_starts"]
    assert all(cold["oracle"] <= n for n in cold.values()), cold
    assert cold["causal_oracle"] <= min(cold[p] for p in ("reactive", "lru", "slora", "slora_prefetch"))


def test_a_config_names_the_memory_mode_and_the_simulator_needs_a_block_cost():
    with pytest.raises(ValueError, match="adapter_memory must be one of"):
        EngineConfig(adapter_memory="shared")
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        Simulator(workload([]), lambda: None, sim_config(), dataclasses.replace(CAL, kv_bytes_per_token=0))


def test_a_request_waiting_for_memory_keeps_its_place_in_the_queue():
    # 7 usable blocks. A's request (20 + 6 tokens: 2 blocks) runs with its adapter (3): 2 free.
    # B's adapter needs 3: it waits for memory. C (adapter A, resident; 1 block) could run at
    # once, but would take what B waits for: it waits behind B. When A ends, B goes first.
    rows = [(0.0, "A", 20, 6), (0.5, "B", 4, 1), (0.6, "A", 4, 1)]
    sim = run(rows, "lru", sim_config(num_kv_blocks=8, max_model_len=64))
    a, b, c = sim.records()
    assert a.finished <= b.first_token < c.first_token
    # a separate pool has room for B's adapter: B and C run beside A
    separate = run(rows, "lru", sim_config(num_kv_blocks=8, max_model_len=64, memory="separate")).records()
    assert separate[1].first_token < a.finished and separate[2].first_token < a.finished


def test_the_kv_cache_takes_a_prefetch_in_flight_before_it_preempts_a_request():
    from plora_jax.engine.adapter_gate import AdapterGate
    from plora_jax.lora import HostCache, Registry, Residency, SimulatedTransfer, VirtualClock
    from plora_jax.policies import Decision

    clock = VirtualClock()
    blocks = BlockAllocator(10)  # 9 usable; a one-page adapter takes 3
    registry = Registry(None, "float32", 8, 8, ("all",), "paged", 8, PAGE)
    for name in "ab":
        registry.insert(registry.entry(name, None, 8, ("all",), 8000))
    pages = PagePool(9, 5, 1, "paged", KvShare(blocks, PAGE, BLOCK))
    transfer = SimulatedTransfer(clock, lambda job, stage: 5.0)
    core = Residency(registry, pages, HostCache(10**9), HostCache(10**9), transfer, clock)
    gate = AdapterGate(core, clock, lambda: [], lambda name: [])
    core.apply(Decision(device=["a", "b"]))  # two prefetches in flight: 6 blocks
    assert core.is_loading("a") and core.is_loading("b") and blocks.num_free == 3
    assert gate.reclaim(5) and blocks.num_free >= 5 and core.stats()["kv_reclaims"] == 1
    assert core.counters["prefetch_wasted"] == 1  # the cancelled copy is stale when it lands
    clock.advance_to(10.0)
    ready, _ = core.collect()
    assert len(ready) == 1 and core.stats()["stale_dropped"] == 1
    pages.check()
