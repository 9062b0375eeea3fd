"""The simulator's driver: events on one timeline, the serverless instances, the results.

Events are arrivals, policy intervals, step ends, transfer ends, instance starts and
keep-alive expiries, run in time order (ties in the order they were pushed), so a run is
deterministic. Each instance is a `SimInstance` (the engine's scheduler, adapter gate and
residency core on its own virtual clock); `serverless.instances.InstancePool` applies the
routing, start, keep-alive and pre-warm rules the live replay applies. The results are the
same `report.Run` a live replay gives.

With a warm-up (`WorkloadConfig.warmup_minutes`) the run replays it like any other minutes and
measures only what follows: the records of requests arriving from `Workload.measured_from_s`
on, and every counter, byte-second, stall and instance start as its change since then (a snapshot
of the figures at that moment); a prefetch issued in the warm-up counts as neither used nor
wasted in the window.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ...buckets import cdiv
from ...config import EngineConfig
from ...engine.compile_plan import Buckets
from ...engine.kv_blocks import check_capacity
from ...engine.sampling import SamplingParams
from ...engine.scheduler import Request
from ...lora import Residency
from ...lora.page_allocator import kv_blocks_for
from ...metrics import ADAPTER_COUNTERS, adapter_mem_util, adapter_pool_fill
from ...policies import Policy, adapter_loads
from ..instances import InstancePool
from ..report import RequestRecord, Run, summarize
from ..workload import TraceRequest, Workload, request_lengths, workload_policy
from .costs import Calibration
from .instance import SimInstance


@dataclass(frozen=True)
class SimConfig:
    """A simulation's settings: every instance's engine settings (the `EngineConfig` a live engine
    runs with, so a live run and its simulation share one config) and the serverless ones. The
    simulator reads the scheduling fields (`max_model_len`, `block_size`, `num_kv_blocks`,
    `max_num_seqs`, `max_num_batched_tokens`, `max_prefill_seqs`, `min_prefill_bucket`), the
    adapter pool's (`max_loras`, `lora_pool_pages`, `page_rows`, `max_lora_rank`, `layout`),
    `host_cache_mb`, `node_cache_mb` (with `adapter_store`), `max_prefetch_inflight`,
    `adapter_loads` and `adapter_memory`."""

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lora_pool_pages=64, host_cache_mb=2.0**20))
    instances: int = 1  # most instances at once
    min_instances: int = 1  # instances kept warm (0: scale to zero)
    keep_alive_s: float = 600.0  # an idle instance above min_instances stops after this long
    prewarm: bool = True  # a forecasting policy may start an instance ahead of demand
    adapters_on_host: bool = False  # every adapter starts in the host cache (S-LoRA keeps them all in host memory)
    # Where the adapters live: "disk" (local folders on every node) or "store" (an object store:
    # each instance's node cache starts empty and a first use fetches over the store link).
    adapter_store: str = "disk"

    def __post_init__(self):
        if self.adapter_store not in ("disk", "store"):
            raise ValueError(f"SimConfig.adapter_store must be 'disk' or 'store', got {self.adapter_store!r}")
        if self.engine.lora_pool_pages < 2:
            raise ValueError("SimConfig.engine.lora_pool_pages must be set (>= 2): the simulator sizes pools in pages")

    @property
    def pool_pages(self) -> int:
        return self.engine.lora_pool_pages

    @property
    def host_cache_bytes(self) -> int:
        return int(self.engine.host_cache_mb * 2**20)

    @property
    def node_cache_bytes(self) -> int:
        return int(self.engine.node_cache_mb * 2**20)


SYNC_FIGURES = ("sync_waits", "sync_wait_s")  # the synchronous loads steps waited on, and their seconds


@dataclass(eq=False)
class SimRequest:
    index: int
    trace: TraceRequest
    instance: int = -1
    instance_wait: float = 0.0  # waited for its instance to start
    request: Request | None = None  # the engine's request, once routed


class Simulator:
    def __init__(
        self,
        workload: Workload,
        make_policy: Callable[[], Policy],
        config: SimConfig,
        calibration: Calibration,
        interval_s: float | None = None,
    ):
        if calibration.bytes_per_rank <= 0:
            raise ValueError("calibration.bytes_per_rank must be > 0 (device bytes of one rank row)")
        self.workload, self.config, self.calibration = workload, config, calibration
        self.interval_s = interval_s if interval_s is not None else workload.config.seconds_per_minute
        self.adapter_names = tuple(workload.ranks)
        self.page_bytes = config.engine.page_rows * calibration.bytes_per_rank
        self.unified = config.engine.adapter_memory == "unified"  # adapter pages paid in KV blocks
        if self.unified and calibration.kv_bytes_per_token <= 0:
            raise ValueError('adapter_memory="unified" needs calibration.kv_bytes_per_token > 0 (a KV block\'s cost)')
        self.buckets = Buckets.build(config.engine, config.engine.max_model_len, 0)  # the compiled step sizes
        e = config.engine
        self.kv_block_bytes = e.block_size * calibration.kv_bytes_per_token
        max_pages = cdiv(e.max_lora_rank, e.page_rows)
        adapter_blocks = kv_blocks_for(max_pages, self.page_bytes, self.kv_block_bytes) if self.unified else 0
        check_capacity(e.num_kv_blocks, e.block_size, e.max_model_len, adapter_blocks)
        self.cores: list[Residency] = []  # every instance's residency core, stopped ones included
        self.engines: list[SimInstance] = []  # every instance, stopped ones included
        self.seq = itertools.count()
        self.events: list = []
        self.finished = self.failed = 0
        self.requests = [SimRequest(i, r) for i, r in enumerate(workload.requests)]
        self.mem_samples: list[tuple[float, float, float]] = []  # (time, live/reserved, reserved/pool)
        self.now = 0.0
        self.pool = InstancePool(self, make_policy, SimInstance)
        self.measured_from = workload.measured_from_s
        self.before: dict[int, dict] = {}  # id(core or gate) -> its figures at measured_from (warm-up)

    def push(self, when: float, kind: str, instance: int, payload=None) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, instance, payload))

    def engine_request(self, request: SimRequest, now: float) -> Request:
        """The engine request a live replay would submit for `request` (`request_lengths`:
        token-id prompt of the trace's length, exactly the trace's output length)."""
        max_len = self.config.engine.max_model_len
        prompt, max_tokens = request_lengths(request.trace, max_len)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids, adapter = [0] * prompt, request.trace.adapter
        request.request = Request(str(request.index), ids, params, 0, frozenset(), max_len, adapter, arrival=now)
        return request.request

    def instance_idle(self, instance: SimInstance, now: float) -> None:
        self.pool.idle(instance, now)

    def sample_memory(self, now: float) -> None:
        live = reserved = total = 0
        for inst in self.pool.up(now):
            live += inst.pages.live_bytes
            reserved += inst.pages.pages_used * self.page_bytes
            total += (inst.pages.num_pages - 1) * self.page_bytes
        if reserved:
            self.mem_samples.append((now, adapter_mem_util(live, reserved), adapter_pool_fill(reserved, total)))

    def run(self) -> Simulator:
        if self.measured_from > 0:  # when the first measured request can reach an instance (ahead of it)
            self.push(self.measured_from + self.calibration.request_overhead_s, "measure", -1)
        for request in self.requests:  # each reaches the serverless layer after the caller's hand-off
            self.push(request.trace.arrival_s + self.calibration.request_overhead_s, "arrival", -1, request)
        horizon = self.workload.duration_s
        t = 0.0
        while t <= horizon:
            self.push(t, "interval", -1)
            t += self.interval_s
        self.pool.start(0.0)
        while self.events:
            now, _, kind, index, payload = heapq.heappop(self.events)
            self.now = now
            if kind == "arrival":
                self.pool.route(payload, now)
            elif kind == "interval":
                self.pool.interval(now)
                self.sample_memory(now)
            elif kind == "step_end":
                self.pool.instances[index].iterate(now)
            elif kind == "load_done":
                self.pool.instances[index].load_done(now)
            elif kind == "instance_ready":
                self.pool.ready(index, now)
            elif kind == "keep_alive":
                self.pool.expire(index, now)
            elif kind == "measure":
                self.before = {id(core): core.stats() for core in self.cores}
                self.before |= {id(engine): engine.figures(self.now) for engine in self.engines}
                self.before[id(self.pool)] = self.instance_figures()
                for core in self.cores:
                    core.track_prefetches_from_now()
        return self

    def since_measured(self, owner, stats: dict, key: str) -> float:
        """`stats[key]` of `owner` (a core or an engine) less its value when measuring began."""
        return stats[key] - self.before.get(id(owner), {}).get(key, 0)

    def instance_figures(self) -> dict:
        """The instance pool's counts (the warm-up's are left out of the figures)."""
        p = self.pool
        return {"starts": p.starts, "prewarms": p.prewarms, "stops": p.stops, "start_waits": len(p.start_waits)}

    def forecast_step(self, policy: Policy) -> None:
        policy.step()  # a forecaster's interval on the simulated clock (a no-op for the others)

    def records(self) -> list[RequestRecord]:
        """The measured requests' records (those arriving after the warm-up)."""
        out = []
        for r in self.requests:
            if r.trace.arrival_s < self.measured_from:
                continue
            req = r.request
            done = req is not None and req.finish_reason == "length"
            out.append(
                RequestRecord(
                    r.trace.arrival_s,
                    req.first_token if done else None,
                    req.finished_at if done else None,
                    req is not None and req.adapter_cold,
                    req.adapter_wait if req is not None else 0.0,
                    len(req.output_ids) if req is not None else 0,
                    r.instance_wait,
                    self.calibration.request_overhead_s,
                    r.index,
                    req.adapter_tier if req is not None else "",
                )
            )
        return out

    def result(self) -> Run:
        memory = [(t, u) for t, u, _ in self.mem_samples if t >= self.measured_from]
        stats = [(core, core.stats()) for core in self.cores]
        live, reserved = (
            sum(self.since_measured(c, s, k) for c, s in stats)
            for k in ("adapter_live_byte_s", "adapter_reserved_byte_s")
        )
        util = adapter_mem_util(live, reserved)
        instances = self.instance_figures()
        waits = self.pool.start_waits[self.before.get(id(self.pool), {}).get("start_waits", 0) :]
        extra = {
            "instance_starts": self.since_measured(self.pool, instances, "starts"),
            "instance_prewarms": self.since_measured(self.pool, instances, "prewarms"),
            "instance_stops": self.since_measured(self.pool, instances, "stops"),
            "instance_start_wait_mean_s": float(np.mean(waits)) if waits else 0.0,
            "compiles_after_warmup": 0,
            "stall_s": sum(self.since_measured(e, e.figures(), "stall_row_s") for e in self.engines),
            "busy_s": (busy := sum(self.since_measured(e, e.figures(), "busy_s") for e in self.engines)),
            **{k: sum(self.since_measured(e, e.figures(), k) for e in self.engines) for k in SYNC_FIGURES},
        }
        records = self.records()
        # Requests served per second the engines were busy: capacity, however bursty the arrivals.
        extra["served_per_busy_s"] = sum(r.finished is not None for r in records) / busy if busy else 0.0
        return Run(summarize(records, self.counters(), util, extra), records, memory)

    def counters(self) -> dict:
        """The adapter counters (`plora_jax.metrics`) summed over every instance that ran."""
        total = dict.fromkeys(ADAPTER_COUNTERS, 0)
        for core in self.cores:
            stats = core.stats()  # the counters, host-cache evictions included
            for name in total:
                total[name] += self.since_measured(core, stats, name)
        return total


def simulate(
    workload: Workload,
    policy: str,
    config: SimConfig,
    calibration: Calibration,
    predictor_checkpoint: str = "",
) -> Run:
    """Replay `workload` under `policy` in simulation."""
    if adapter_loads(policy) == "sync":
        config = replace(config, engine=replace(config.engine, adapter_loads="sync"))
    interval = workload.config.seconds_per_minute
    sim: Simulator | None = None  # the factory runs inside sim.run(), after the assignment below
    keep = config.engine.retention_intervals
    factory = lambda: workload_policy(policy, workload, interval, lambda: sim.now, predictor_checkpoint, keep)
    sim = Simulator(workload, factory, config, calibration, interval)
    return sim.run().result()
