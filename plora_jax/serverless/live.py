"""Live replay: a workload against real engines on this machine, in real time.

`replay_live` runs one policy over a `Fleet` of engines: `min_instances` warm engines, started
once and kept across policies (each replay resets their adapter pools and host caches, so every
policy starts from the same cold state), and, up to `instances`, engines that start on demand
and stop after `keep_alive_s` idle (scale to zero with `min_instances=0`). Every request is
submitted at its arrival time from one thread: token-id prompts of the trace's lengths
(`workload.request_lengths`), greedy, `ignore_eos`, so each produces exactly its trace output
length. Requests go to an instance by `instances.pick_instance` (affinity, then the least
loaded); one routed to a starting instance waits for it (its TTFT includes the wait). The
engines' own metrics (TTFT, adapter wait, cold start) and counters make the summary, so live
and simulated runs are measured alike (`report.summarize`).

`calibrate` gives the simulator its cost profile: the steps the engines recorded during the
replays (`Engine.record_steps`), with a few timed runs on a warm engine to cover what the
replay may not (a full batch, long prompts, every row on an adapter), fitted by
`sim.costs.fit`; the loads' effective bytes per second from the replays; the instance start.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..engine.api import freeze_heap
from ..engine.sampling import SamplingParams
from ..lora.node_cache import is_remote
from ..lora.peft import save_random_adapter
from ..metrics import ADAPTER_COUNTERS, TRANSFER_SOURCES, adapter_mem_util
from ..policies import adapter_loads
from ..policies.retention import RETENTION_INTERVALS
from .instances import InstanceLoad, keep_alive_expired, pick_instance
from .report import RequestRecord, Run, summarize
from .sim import Calibration
from .sim.costs import fit
from .workload import Workload, request_lengths, workload_policy


def write_adapters(workload: Workload, model_config, folder: str | Path, targets: tuple[str, ...]) -> Path:
    """One random PEFT adapter folder per workload adapter, at its rank (skips existing ones)."""
    folder = Path(folder)
    for i, (name, rank) in enumerate(workload.ranks.items()):
        path = folder / name
        if not (path / "adapter_config.json").exists():
            save_random_adapter(path, model_config, rank, targets, seed=i, scale=0.02, dtype=np.float16)
    return folder


def _prompt(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab - 1, size=n).tolist()


class Fleet:
    """The engines of live replays. `make_engine(**overrides)` builds one engine; every engine
    registers every adapter of `workload` from `adapter_dir` (a folder, or a store's prefix:
    then every replay starts with the engines' node caches emptied, so first uses fetch
    again). The `min_instances` warm engines start in `start` (or on entering the `with`
    block) and stay until `close`."""

    def __init__(
        self,
        make_engine,
        adapter_dir: str | Path,
        workload: Workload,
        instances: int = 1,
        min_instances: int | None = None,
        keep_alive_s: float = 60.0,
        record_steps: bool = False,
        max_num_seqs: int = 16,
    ):
        min_instances = instances if min_instances is None else min_instances
        if instances < 1 or not 0 <= min_instances <= instances:
            raise ValueError(f"need 0 <= min_instances <= instances >= 1, got {min_instances}, {instances}")
        self.make_engine, self.workload = make_engine, workload
        # A store's prefix (s3://...) stays a string; each replay then starts from an empty node cache.
        self.remote = is_remote(adapter_dir)
        self.adapter_dir = adapter_dir if self.remote else Path(adapter_dir)
        self.instances, self.min_instances, self.keep_alive_s = instances, min_instances, keep_alive_s
        self.record_steps = record_steps
        self.max_num_seqs = max_num_seqs  # an instance's rows (the routing rule's capacity), from its engines once up
        self.warm: list = []  # the warm engines
        self.start_s: list[float] = []  # seconds each engine took to start (warm and on demand)

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        try:
            while len(self.warm) < self.min_instances:
                self.warm.append(self.boot())
        except BaseException:
            self.close()
            raise
        freeze_heap()

    def boot(self, warm: bool = True, **overrides):
        """A new engine with every adapter registered (on the caller's thread); `warm`: also wait
        for its background compiles (a fleet's warm engine; an instance started on demand serves
        as soon as its minimal executables are ready, as a scaled-from-zero one would)."""
        started = time.perf_counter()
        engine = self.make_engine(**overrides)
        try:
            result = engine.add_adapter_dir(self.adapter_dir)
            missing = set(self.workload.ranks) - set(result["added"])
            if missing:
                raise ValueError(
                    f"{self.adapter_dir}: adapters missing or refused: {sorted(missing)[:5]} {result['errors']}"
                )
            if self.record_steps and warm:  # steps while executables still build are not a steady state
                engine.record_steps(True)
            if warm:
                engine.wait_warm()
        except BaseException:
            engine.close()
            raise
        self.start_s.append(time.perf_counter() - started)
        self.max_num_seqs = engine.config.max_num_seqs
        return engine

    def close(self) -> None:
        for engine in self.warm:
            engine.close()
        self.warm = []


class _Slot:
    """One instance of a replay: off, starting or up."""

    def __init__(self, engine=None):
        self.engine = engine
        self.warm = engine is not None  # one of the fleet's warm engines (never stopped)
        self.state = "up" if engine is not None else "off"
        self.pending: list = []  # TraceRequests routed here while it starts
        self.handles: list = []
        self.idle_since: float | None = None
        self.error: BaseException | None = None

    def load(self) -> int:
        return len(self.pending) + sum(not h.finished for h in self.handles)


def replay_live(
    workload: Workload,
    policy: str,
    fleet: Fleet,
    predictor_checkpoint: str = "",
    seed: int = 0,
    retention_intervals: float = RETENTION_INTERVALS,
) -> Run:
    """Run `workload` under `policy` on `fleet` (see the module docstring); `retention_intervals`:
    predictive's."""
    if workload.config.warmup_minutes:  # the engines' counters would cover the warm-up too
        raise ValueError(
            f"replay_live: warmup_minutes is {workload.config.warmup_minutes}; a measured window after "
            "a warm-up is for the simulator"
        )
    loads = adapter_loads(policy)
    interval = workload.config.seconds_per_minute
    lock = threading.Lock()
    slots = [_Slot(e) for e in fleet.warm] + [_Slot() for _ in range(fleet.instances - len(fleet.warm))]
    origin = time.monotonic()  # replay time 0; set again just before the first request
    clock = lambda: time.monotonic() - origin
    make_policy = lambda: workload_policy(policy, workload, interval, clock, predictor_checkpoint, retention_intervals)
    rng = np.random.default_rng(seed)
    start_times, start_waits, submitted, steps = [], [], [], []
    counted: list[dict] = []  # counters of every engine that ran, as deltas over this replay
    before = {}
    policies = {id(slot): make_policy() for slot in slots if slot.warm}
    for slot in slots[: len(fleet.warm)]:
        # The new policy first (the last one stops here), then the cold state it starts from.
        slot.engine.set_policy(policies[id(slot)])
        policies[id(slot)].wait_ready(60.0)  # a forecaster compiles before the clock starts, not under traffic
        slot.engine.reset_adapters(loads, node_cache=fleet.remote)
        before[id(slot)] = slot.engine.stats(fresh=True)
        if fleet.record_steps:
            slot.engine.recorded_steps()  # forget the reset's and warm-up's steps
    closed = False  # the replay is over: an instance that finishes starting closes itself
    booting: list[threading.Thread] = []
    index_of = {id(tr): i for i, tr in enumerate(workload.requests)}  # records name their request

    def submit(slot: _Slot, tr, instance_wait: float = 0.0) -> None:
        engine = slot.engine
        prompt_len, max_tokens = request_lengths(tr, engine.max_model_len)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        handle = engine.submit(_prompt(rng, prompt_len, engine.model_config.vocab_size), params, adapter=tr.adapter)
        slot.handles.append(handle)
        submitted.append((index_of[id(tr)], tr.arrival_s, handle, instance_wait))

    def boot(slot: _Slot) -> None:
        engine = None
        try:
            started = time.perf_counter()
            engine = fleet.boot(warm=False, adapter_loads=loads)
            p = make_policy()
            if hasattr(p, "set_origin"):
                p.set_origin(origin)
            engine.set_policy(p)
            p.wait_ready(60.0)  # part of the instance's start
            with lock:
                if closed:
                    raise RuntimeError("the replay ended while this instance started")
                slot.engine, slot.state = engine, "up"
                start_times.append(time.perf_counter() - started)
                for tr in slot.pending:
                    start_waits.append(clock() - tr.arrival_s)
                    submit(slot, tr, start_waits[-1])
                slot.pending.clear()
        except BaseException as e:  # reported by the replay thread
            if engine is not None and slot.engine is not engine:
                engine.close()
            slot.error = e

    def launch(slot: _Slot) -> None:
        slot.state, slot.idle_since = "starting", None
        thread = threading.Thread(target=boot, args=(slot,), name="plora-instance-start", daemon=True)
        booting.append(thread)
        thread.start()

    def detach(slot: _Slot):
        """Under the lock: take the slot's engine out of the replay (a warm one stays in its slot)."""
        engine = slot.engine
        if not slot.warm:
            slot.engine, slot.state, slot.handles, slot.idle_since = None, "off", [], None
        return slot, engine

    def stop(slot: _Slot, engine) -> None:
        """Outside the lock: take the engine's counters (and recorded steps); close it unless warm."""
        try:
            if fleet.record_steps:
                steps.extend(engine.recorded_steps())
            stats = engine.stats(fresh=True)
            counted.append({k: stats.get(k, 0) - before.get(id(slot), {}).get(k, 0) for k in _COUNTED})
        finally:
            if not slot.warm:
                engine.close()

    def check() -> None:
        failed = next((s.error for s in slots if s.error is not None), None)
        if failed is not None:
            raise RuntimeError(f"an instance failed to start: {failed}") from failed

    def expire(now: float) -> list:
        """Under the lock: detach the instances idle past the keep-alive (`stop` them after)."""
        expired = []
        for slot in slots:
            if slot.state != "up" or slot.warm:
                continue
            if slot.load():
                slot.idle_since = None
                continue
            slot.idle_since = now if slot.idle_since is None else slot.idle_since
            active = sum(s.state != "off" for s in slots)
            if keep_alive_expired(slot.idle_since, now, fleet.keep_alive_s, active, fleet.min_instances):
                expired.append(detach(slot))
                stops[0] += 1
        return expired

    origin, origin_perf = time.monotonic(), time.perf_counter()
    for p in policies.values():
        if hasattr(p, "set_origin"):
            p.set_origin(origin)  # the oracle's arrival times count from here
    mem_samples, next_sample, stops = [], 0.0, [0]

    def sample(now: float) -> None:
        nonlocal next_sample
        if now >= next_sample:  # memory use, once per interval
            mem_samples.append((now, [s.engine.stats() for s in slots if s.state == "up"]))
            next_sample += interval

    try:
        for tr in workload.requests:
            while True:
                now = clock()
                with lock:
                    check()
                    sample(now)
                    expired = expire(now)
                for slot, engine in expired:
                    stop(slot, engine)
                if now >= tr.arrival_s:
                    break
                time.sleep(max(0.0, min(0.01, tr.arrival_s - now, next_sample - now)))
            with lock:
                active = [i for i, s in enumerate(slots) if s.state != "off"]
                rows = [
                    InstanceLoad(i, _holds(slots[i], tr.adapter), slots[i].load(), fleet.max_num_seqs) for i in active
                ]
                index = pick_instance(rows)
                off = [s for s in slots if s.state == "off"]
                if index is not None:
                    slot = slots[index]
                elif off:
                    slot = off[0]
                    launch(slot)
                else:
                    slot = min((slots[i] for i in active), key=_Slot.load)
                if slot.state == "up":
                    submit(slot, tr)
                else:
                    slot.pending.append(tr)
        while True:  # requests still waiting for a starting instance, then the last completions
            with lock:
                check()
                sample(clock())
                if not any(s.pending for s in slots) and all(h.finished for _, _, h, _ in submitted):
                    break
            time.sleep(0.01)
        records = []
        for index, arrival, handle, instance_wait in submitted:
            out = handle.result()
            m = out.metrics
            at = m.arrival_time - origin_perf  # when the engine got it (later than arrival if it waited)
            lag = max(0.0, at - arrival - instance_wait)
            records.append(
                RequestRecord(
                    arrival, at + m.ttft_s, at + m.e2e_s, m.cold_start, m.adapter_wait_s, len(out.token_ids),
                    instance_wait, lag, index, m.adapter_tier,
                )
            )  # fmt: skip
    finally:
        with lock:
            closed = True
            ending = [detach(slot) for slot in slots if slot.engine is not None]
        for thread in booting:  # an instance still starting closes itself when it is up
            thread.join()
        errors = []
        for slot, engine in ending:
            try:
                stop(slot, engine)
            except Exception as e:  # the others still close; the replay's own error, if any, stays first
                errors.append(e)
        if errors and sys.exc_info()[0] is None:
            raise errors[0]
    counters = {k: sum(c[k] for c in counted) for k in _COUNTED}
    memory = _memory_series(mem_samples)
    extra = {k: counters.pop(k) for k in _EXTRA}
    extra |= {
        "instance_starts": len(start_times),
        "instance_start_mean_s": float(np.mean(start_times)) if start_times else 0.0,
        "instance_start_wait_mean_s": float(np.mean(start_waits)) if start_waits else 0.0,
        "instance_stops": stops[0],  # after the keep-alive, before the replay's end
    }
    util = adapter_mem_util(extra.pop("adapter_live_byte_s"), extra.pop("adapter_reserved_byte_s"))
    return Run(summarize(records, counters, util, extra), records, memory, steps)


_EXTRA = (
    *("compiles_after_warmup", "adapter_loads", "adapter_load_s_total"),
    *(f"adapter_transfer_{what}_from_{tier}" for what in ("s", "bytes") for tier in TRANSFER_SOURCES),
    *("policy_fallbacks", "adapter_live_byte_s", "adapter_reserved_byte_s", "stall_s"),
    # The remote link, when adapters come from a store (lora.node_cache; 0 for local folders).
    *("node_cache_misses", "node_cache_hits", "node_cache_fetch_s", "node_cache_link_yields"),
)
_COUNTED = (*ADAPTER_COUNTERS, *_EXTRA)  # what a replay reports as its engines' deltas


def _memory_series(mem_samples: list[tuple[float, list[dict]]]) -> list[tuple[float, float]]:
    """(time, adapter memory utilisation over every instance up then), from stats samples."""
    return [
        (t, adapter_mem_util(sum(s["adapter_live_bytes"] for s in up), sum(s["adapter_reserved_bytes"] for s in up)))
        for t, up in mem_samples
        if sum(s["adapter_reserved_bytes"] for s in up)
    ]


def _holds(slot: _Slot, adapter: str | None) -> bool:
    """Whether the adapter is placed on the slot's engine's device, from the snapshot the engine
    last published (a routing hint that may be a step out of date, never a decision that must hold)."""
    return slot.state == "up" and adapter is not None and adapter in slot.engine.resident_adapters()


def _resident_set(engine) -> list[str]:
    """Registered adapters, smallest first, as many as the device pool holds at once."""
    config = engine.config
    pages_left, slots_left = engine.stats().get("adapter_pages_total", 0), config.max_loras
    slot_pages = -(-config.max_lora_rank // config.page_rows)  # what a contiguous slot reserves
    chosen = []
    for a in sorted(engine.adapters(), key=lambda a: a["num_pages"]):
        pages = slot_pages if config.layout == "contiguous" else a["num_pages"]
        if pages <= pages_left and slots_left > 0:
            chosen.append(a["name"])
            pages_left -= pages
            slots_left -= 1
    return chosen


def transfer_rates(host_s: float, host_bytes: float, disk_s: float, disk_bytes: float) -> tuple[float, float]:
    """(host-to-device, disk) bytes per second from the transfer's own time on loads staged from
    the host cache and on loads read from the folder first: the second pay the copy too, so
    the disk rate is what their time adds beyond it. Without host-cache loads, the disk read is
    folded into one rate (disk rate 0, as `Calibration.load_s` reads it)."""
    if host_s <= 0 or host_bytes <= 0:
        return (disk_bytes / disk_s if disk_s > 0 and disk_bytes else 2e9), 0.0
    h2d = host_bytes / host_s
    extra = disk_s - disk_bytes / h2d
    return h2d, (disk_bytes / extra if extra > 0 and disk_bytes else 0.0)


def calibrate(engine, instance_start_s: float, runs: list[Run] = ()) -> Calibration:
    """The simulator's cost profile for a warm `engine` (one of the fleet that ran `runs`, which
    must have recorded their steps): step terms fitted to the replays' steps and to timed runs
    here (decode at one row and a full batch, prefill at short and long chunks, the same with
    every row on an adapter, loaded first so no load is timed); loads' bytes per second from
    the replays, and the store link's latency and rate from the node cache's fetches (the line
    `metrics.LinkFit` fits), when adapters came from a store; `instance_start_s` is how long an
    engine took to start (construction and warm-up, with whatever the parameter and compilation
    caches held)."""
    rng = np.random.default_rng(0)
    vocab, rows = engine.model_config.vocab_size, engine.config.max_num_seqs
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    chunk = min(engine.runner.buckets.prefill[-1], engine.max_model_len // 2)
    engine.record_steps(True)
    engine.recorded_steps()

    def timed_runs(adapters: list[str | None]) -> None:
        names = [adapters[i % len(adapters)] for i in range(rows)]
        for batch in (1, max(1, rows // 2), rows):
            engine.generate([_prompt(rng, 8, vocab) for _ in range(batch)], greedy(17), adapters=names[:batch])
        for tokens in (16, chunk):
            for _ in range(3):
                engine.generate([_prompt(rng, tokens, vocab)], greedy(1), adapters=names[:1])

    timed_runs([None])
    adapters = _resident_set(engine)
    if adapters:
        from ..policies import make_policy

        engine.set_policy(make_policy("lru"))  # keep them resident between the timed runs
        engine.generate([_prompt(rng, 8, vocab) for _ in adapters], greedy(1), adapters=adapters)  # loads them
        engine.recorded_steps()  # not the loads' steps
        timed_runs(adapters)
    steps = engine.recorded_steps() + [step for run in runs for step in run.steps]
    stats = engine.stats()
    total = lambda key: sum(r.summary.get(key, 0) for r in runs)
    h2d, disk = transfer_rates(
        *(total(f"adapter_transfer_{w}_from_{t}") for t in ("host", "disk") for w in ("s", "bytes"))
    )
    lags = [r.submit_lag_s for run in runs for r in run.records]
    store = {}  # the store link's fitted line, when the replays fetched adapters from a store
    if stats.get("link_remote_to_disk_bytes_per_s", 0) > 0:
        store = dict(
            store_latency_s=stats["link_remote_to_disk_latency_s"],
            store_bytes_per_s=stats["link_remote_to_disk_bytes_per_s"],
        )
    base = Calibration(
        **store,
        request_overhead_s=float(np.mean(lags)) if lags else 0.0,
        load_base_s=0.0,
        h2d_bytes_per_s=h2d,
        disk_bytes_per_s=disk,
        instance_start_s=instance_start_s,
        bytes_per_rank=int(stats.get("adapter_page_bytes", 0) // engine.config.page_rows),
        kv_bytes_per_token=int(stats["kv_block_bytes"] // engine.config.block_size),
    )
    return fit(steps, base, source="live engine on this machine (plora_jax.serverless.live.calibrate)")
