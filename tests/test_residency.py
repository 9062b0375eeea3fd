"""The residency core on a virtual clock, as the simulator runs it: a `SimulatedTransfer` whose
jobs take simulated time, hand-checked timing, and its invariants under random arrivals,
finishes, decisions, failed and stale transfers (hypothesis)."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plora_jax.config import tiny
from plora_jax.engine.kv_blocks import BlockAllocator
from plora_jax.lora import HostCache, KvShare, PagePool, Registry, Residency, SimulatedTransfer, VirtualClock
from plora_jax.lora.host_cache import HostCopy
from plora_jax.lora.transfer import DEMAND, DISK, FETCH, HOST
from plora_jax.policies import Decision
from plora_jax.serverless.sim import simulate

PAGE_BYTES = 1000


def make_core(
    num_pages=9,
    slots=4,
    max_rank=32,
    page_rows=8,
    layout="paged",
    host_budget=10**9,
    disk_budget=10**9,
    failure=None,
    kv_blocks=0,
):
    """`kv_blocks` > 0: one budget with a KV cache of that many blocks of 400 bytes (a page of
    1,000 bytes is worth 3)."""
    clock = VirtualClock()
    registry = Registry(tiny(), "float32", max_rank, page_rows, ("q_proj",), layout, num_pages - 1, PAGE_BYTES)
    kv = KvShare(BlockAllocator(kv_blocks), PAGE_BYTES, 400) if kv_blocks else None
    pages = PagePool(num_pages, slots + 1, max_rank // page_rows, layout, kv)
    # A load takes 1 s plus 1 s per page; a copy already on the host takes half as long.
    transfer = SimulatedTransfer(clock, lambda job, stage: _seconds(job, stage), failure=failure)
    core = Residency(registry, pages, HostCache(host_budget), HostCache(disk_budget), transfer, clock)
    return core, clock, transfer


def _seconds(job, stage):
    """A load takes 1 s plus 1 s per page; a copy already on the host half as long; a fetch from
    the store 10 s plus 10 s per page."""
    if stage == FETCH:
        return 10.0 * (1.0 + job.entry.num_pages)
    return (1.0 + job.entry.num_pages) * (0.5 if job.source else 1.0)


def register(core, name, rank, remote=False):
    """A local adapter (on the node's disk), or with `remote` one only in its store."""
    entry = core.registry.entry(name, None, rank, ("q_proj",), live_bytes=rank * 100)
    if remote:
        entry.source = f"store://{name}"
        core.registry.insert(entry)  # as the simulator registers: the node cache starts empty
    else:
        core.insert(entry)


def test_a_demand_load_takes_its_simulated_time_and_then_hits():
    core, clock, transfer = make_core()
    register(core, "a", 16)  # 2 pages: a 3 s load from "disk"
    assert core.acquire("a") is None and core.residency("a") == "loading"
    assert transfer.next_finish() == 3.0
    clock.advance_to(2.9)
    assert core.collect() == ([], []) and core.is_loading("a")
    clock.advance_to(3.0)
    ready, failures = core.collect()
    assert [j.name for j in ready] == ["a"] and not failures and ready[0].entry.load_s == 3.0
    slot = core.acquire("a", first=False)
    assert slot is not None and core.residency("a") == "device"
    core.release("a")
    assert core.stats()["cold_starts"] == 1 and core.stats()["bytes_host_to_device"] == 2 * PAGE_BYTES
    # Free it and load again: the host copy kept from the first read makes it 1.5 s.
    core.free_when_unused = True
    core.acquire("a")
    core.release("a")
    core.release("a")  # a second release of the same pin changes nothing
    assert core.residency("a") == "host"
    core.acquire("a")
    assert transfer.next_finish() == pytest.approx(4.5)
    core.collect_for("a")  # a blocking wait moves the virtual clock to the load's end
    assert clock() == pytest.approx(4.5) and core.residency("a") == "device"
    core.check()


def test_demand_reads_never_wait_behind_prefetches():
    core, clock, _ = make_core()
    for name in "abcd":
        register(core, name, 8)  # 1 page: 2 s each from disk
    core.apply(Decision(device=["a", "b"], priority={"a": 1.0, "b": 1.0}))  # a reads 0-2, b queued behind it
    clock.advance_to(1.0)
    core.acquire("c")  # demand: its own reader, 1-3, while the prefetches take theirs
    core.acquire("d")  # a second demand queues behind the first: 3-5
    clock.advance_to(3.0)
    ready, _ = core.collect()
    assert [j.name for j in ready] == ["a", "c"] and ready[1].kind == DEMAND
    clock.advance_to(5.0)
    assert [j.name for j in core.collect()[0]] == ["b", "d"]  # b 2-4, d 3-5


def test_a_copy_from_the_host_does_not_wait_behind_a_read_from_disk():
    core, clock, _ = make_core()
    for name in "ab":
        register(core, name, 8)  # 1 page: 2 s from disk, 1 s from the host cache
    core.host.put("b", HostCopy(None, None, 800))
    core.apply(Decision(device=["a"], priority={"a": 1.0}))  # a disk read, 0-2
    core.acquire("b")  # a demand from the host: its own channel, 0-1
    clock.advance_to(1.0)
    assert [j.name for j in core.collect()[0]] == ["b"] and core.is_loading("a")
    clock.advance_to(2.0)
    assert [j.name for j in core.collect()[0]] == ["a"]
    core.check()


def test_a_placement_evicted_in_flight_is_dropped_and_never_committed():
    core, clock, _ = make_core(num_pages=3, slots=2)  # room for one 2-page adapter
    register(core, "a", 16)
    register(core, "b", 16)
    core.apply(Decision(device=["a"], priority={"a": 1.0}))
    core.apply(Decision(priority={"a": 0.0}, evict=["a"]))  # in flight: pinned, not evictable
    assert core.is_loading("a")
    core.remove("a")  # the placement goes; the copy in flight is stale
    clock.advance_to(10.0)
    ready, failures = core.collect()
    assert ready == [] and failures == [] and core.stats()["stale_dropped"] == 1
    assert core.acquire("b") is None  # the pages are free again for another adapter
    core.check()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "finish", "prefetch", "evict", "remove", "readd", "tick", "wait", "reclaim"]),
        st.integers(0, 5),
        st.floats(0.0, 1.0),
    ),
    max_size=60,
)


def test_an_adapter_only_in_its_store_is_fetched_once_then_loads_from_the_node():
    """A demand load of a store-only adapter takes the store link first (20 s for 1 page) and
    then its read (2 s); the node cache keeps it, so after the device and host copies are gone
    the next load reads the node's disk (2 s), a cold start from the disk tier."""
    core, clock, transfer = make_core(host_budget=0)
    register(core, "a", 8, remote=True)
    assert core.residency("a") == "store"
    core.acquire("a")
    assert transfer.next_finish() == 20.0  # the fetch; the read is queued behind it
    clock.advance_to(22.0)
    assert [j.name for j in core.collect()[0]] == ["a"] and core.tier("a") == "device"
    stats = core.stats()
    assert stats["store_misses"] == 1 and stats["bytes_remote_to_disk"] == 800
    assert stats["adapter_transfer_s_from_store"] == 22.0
    core.apply(Decision(evict=["a"]))
    assert core.residency("a") == "disk"
    core.acquire("a")
    clock.advance_to(24.0)
    assert [j.name for j in core.collect()[0]] == ["a"]
    stats = core.stats()
    assert (
        stats["disk_hits"] == 1
        and stats["bytes_remote_to_disk"] == 800
        and stats["adapter_transfer_s_from_disk"] == 2.0
    )


def test_a_demand_fetch_starts_before_prefetches_queued_on_the_store_link():
    """Three disk prefetches go onto the store link (one fetching, two queued); a demand load
    queued later fetches as soon as the link frees, before the two, then reads; the prefetched
    adapter's request finds it on the node's disk: a disk prefetch hit."""
    core, clock, _ = make_core()
    core.max_prefetch_inflight = 3
    for name in ("p1", "p2", "p3", "d"):
        register(core, name, 8, remote=True)
    core.apply(Decision(disk=["p1", "p2", "p3"]))
    assert sorted(core.disk_jobs) == ["p1", "p2", "p3"] and core.stats()["disk_prefetch_issued"] == 3
    clock.advance_to(5.0)
    core.acquire("d")  # p1 is fetching until 20 s
    done = {}  # when each reached its tier
    while core.loading or core.disk_jobs:
        core.collect(block=True)
        for name in ("p1", "p2", "p3", "d"):
            if core.tier(name) != "store":
                done.setdefault(name, clock())
    assert done["p1"] == 20.0 and done["d"] == 42.0  # fetched 20-40 s, read 40-42 s
    assert done["p2"] == 60.0 and done["p3"] == 80.0  # after the demand fetch
    assert core.arrive("p2") == "disk"
    stats = core.stats()
    assert stats["disk_prefetch_used"] == 1 and stats["disk_prefetch_hits"] == 1
    assert stats["store_misses"] == 1 and stats["disk_hits"] == 1


def test_a_disk_prefetch_dropped_unused_is_wasted():
    core, clock, _ = make_core(disk_budget=800)  # room for one rank-8 adapter
    for name in ("a", "b"):
        register(core, name, 8, remote=True)
    core.apply(Decision(disk=["a"], priority={"a": 0.1}))
    clock.advance_to(20.0)
    core.collect()
    core.apply(Decision(disk=["b"], priority={"a": 0.0, "b": 0.5}))  # "b" outranks "a": it makes room
    stats = core.stats()
    assert "a" not in core.disk and stats["disk_prefetch_wasted"] == 1 and stats["disk_prefetch_issued"] == 2
    assert stats["disk_prefetch_wasted_bytes"] == 800
    core.check()


@settings(max_examples=60, deadline=None)
@given(
    ops=OPS, layout=st.sampled_from(["paged", "contiguous"]), seed=st.integers(0, 3), kv_blocks=st.sampled_from([0, 12])
)
def test_invariants_under_random_operations_on_the_virtual_clock(ops, layout, seed, kv_blocks):
    """No page leaks or is owned twice, pins never go negative or release a pinned adapter,
    every device job is either committed, dropped as stale or failed, exactly once; with one
    budget for KV and adapters, no KV block leaks either (reclaims drawn among the rest)."""
    failing = {f"a{seed}"}  # this adapter's transfers fail

    def failure(job):
        return RuntimeError("injected") if job.name in failing else None

    core, clock, transfer = make_core(
        layout=layout, host_budget=3000, disk_budget=4000, failure=failure, kv_blocks=kv_blocks
    )
    submitted = []
    submit = transfer.submit
    transfer.submit = lambda job: submitted.append(job) or submit(job)
    ranks = [8, 16, 24, 32, 8, 16]
    for i, rank in enumerate(ranks):
        register(core, f"a{i}", rank, remote=i % 2 == 1)
    held: dict[str, int] = {}
    outcomes: dict[int, str] = {}

    def collect(block=False):
        ready, failures = core.collect(block)
        for job in ready:
            assert id(job) not in outcomes, "a job handed back twice"
            outcomes[id(job)] = "committed"
        return failures

    for op, key, value in ops:
        name = f"a{key}"
        if op == "arrive" and name in core.entries:
            if core.acquire(name) is not None:
                held[name] = held.get(name, 0) + 1
        elif op == "finish" and held.get(name):
            core.release(name)
            held[name] -= 1
        elif op == "prefetch":
            core.apply(Decision(device=[name], host=[name], disk=[name], priority={name: value}))
        elif op == "evict":
            core.apply(Decision(evict=[name]))
        elif op == "remove" and name in core.entries and not held.get(name):
            core.remove(name)
        elif op == "readd" and name not in core.entries and name not in core.removing:
            register(core, name, ranks[key], remote=key % 2 == 1)
        elif op == "tick":
            clock.advance_to(clock() + 3.0 * value)
            collect()
        elif op == "wait":
            collect(block=True)
        elif op == "reclaim":
            want, before = int(1 + 12 * value), set(core.pages.resident)
            # in use by requests, or a demand load in flight: never taken (a prefetch in flight may be)
            kept = {n for n, r in core.pages.resident.items() if r.pins and n not in core.loading}
            kept |= {n for n, job in core.loading.items() if job.kind == DEMAND}
            freed = core.reclaim(want)
            gone = before - set(core.pages.resident)
            assert freed == (kv_blocks > 0 and core.pages.kv.blocks.num_free >= want)
            assert not gone & kept and (freed or not gone)  # all or nothing
        core.check()
        if kv_blocks:
            assert core.pages.kv.blocks.num_free + core.pages.kv_blocks_held == kv_blocks - 1
        for n, count in held.items():
            if count:
                assert core.pages.get(n) is not None and core.pages.get(n).pins >= count, n
    for name, count in held.items():
        for _ in range(count):
            core.release(name)
    while core.loading or core.host_jobs or core.disk_jobs:
        collect(block=True)
    clock.advance_to(clock() + 1e6)  # jobs whose placement went meanwhile come back too (as stale)
    collect()
    assert transfer.next_finish() is None
    core.check()
    assert all(r.pins == 0 for r in core.pages.resident.values())
    device_jobs = [j for j in submitted if j.kind not in (HOST, DISK)]
    committed = sum(outcomes.get(id(j)) == "committed" for j in device_jobs)
    failed = sum(j.error is not None for j in device_jobs)
    stats = core.stats()
    assert committed + failed + stats["stale_dropped"] == len(device_jobs)
    assert stats["load_failures"] == sum(j.error is not None for j in submitted)


def test_an_adapter_wait_ends_when_the_adapter_lands_not_when_the_request_is_admitted():
    from plora_jax.engine.adapter_gate import AdapterGate
    from plora_jax.engine.sampling import SamplingParams
    from plora_jax.engine.scheduler import Request

    core, clock, _ = make_core()
    register(core, "a", 16)  # a 3 s load from "disk"
    gate = AdapterGate(core, clock, lambda: [], lambda name: [])
    request = Request("r", [1, 2], SamplingParams(max_tokens=1), 0, frozenset(), 64, "a")
    gate.arrive(request)
    assert request.adapter_cold and core.stats()["cold_starts"] == 1
    assert not gate.acquire(request)  # its load starts at t = 0
    clock.advance_to(3.0)
    core.collect()  # landed and committed at 3 s
    clock.advance_to(5.0)  # the batch had no free row until 5 s
    assert gate.acquire(request) and request.adapter_wait == pytest.approx(3.0)
    # a request arriving once it is resident is a hit that waits 0
    hit = Request("h", [1], SamplingParams(max_tokens=1), 0, frozenset(), 64, "a")
    gate.arrive(hit)
    assert not hit.adapter_cold and gate.acquire(hit) and hit.adapter_wait == 0.0
    assert core.stats()["device_hits"] == 1 and core.stats()["cold_starts"] == 1


def test_a_demand_load_of_an_adapter_being_fetched_reads_it_when_that_fetch_lands():
    """A disk prefetch is fetching "a" (0-20 s); a demand load at 5 s does not fetch it again:
    it reads once that fetch lands (20-22 s), and the store's bytes are counted once."""
    core, clock, _ = make_core()
    register(core, "a", 8, remote=True)
    core.apply(Decision(disk=["a"]))
    clock.advance_to(5.0)
    core.acquire("a")
    assert not core.loading["a"].fetch and core.loading["a"].after is core.disk_jobs["a"]
    ready = []
    while core.loading or core.disk_jobs:
        ready += [(job.name, clock()) for job in core.collect(block=True)[0]]
    assert ready == [("a", 22.0)]
    assert core.stats()["bytes_remote_to_disk"] == 800 and core.tier("a") == "device"


def test_adapters_in_a_store_cost_their_fetch_once_per_node_and_report_the_tier():
    """Adapters only in their store: A's first load fetches (10 s on the store link) before its
    2 s load; reactive frees it and no host cache keeps it, so its next request loads again
    from the node cache (2 s). The records and the summary say which tier each came from."""
    from test_replay import CAL, CFG, hand_workload  # the replay tests' round costs and workload

    no_host = dataclasses.replace(CFG.engine, host_cache_mb=0.0)
    store = dataclasses.replace(CFG, engine=no_host, adapter_store="store")
    cal = dataclasses.replace(CAL, store_latency_s=10.0, store_bytes_per_s=1e30)
    w = hand_workload([(0.0, "A"), (20.0, "A")])
    run = simulate(w, "reactive", store, cal)
    assert [(r.tier, r.adapter_wait_s) for r in run.records] == [("store", 12.0), ("disk", 2.0)]
    m = run.summary
    assert (m["cold_from_store"], m["cold_from_store_median_s"]) == (1, 12.0)
    assert (m["cold_from_disk"], m["cold_from_disk_median_s"]) == (1, 2.0)
    assert m["bytes_remote_to_disk"] == 8 * CAL.bytes_per_rank
    local = simulate(w, "reactive", dataclasses.replace(CFG, engine=no_host), cal).records  # in local folders
    assert [(r.tier, r.adapter_wait_s) for r in local] == [("disk", 2.0), ("disk", 2.0)]


def test_a_link_fit_recovers_latency_and_rate_and_falls_back_to_one_rate():
    from plora_jax.metrics import LinkFit

    fit = LinkFit()
    for nbytes in (1e6, 4e6, 9e6):
        fit.add(nbytes, 0.05 + nbytes / 1e8)
    assert fit.line() == pytest.approx((0.05, 1e8))
    one = LinkFit()
    one.add(2e6, 0.5)
    one.add(2e6, 0.5)
    assert one.line() == (0.0, 4e6) and LinkFit().line() == (0.0, 0.0)
