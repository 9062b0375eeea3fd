"""A discrete-event simulator of the serverless multi-LoRA engine, for whole trace windows.

What it models is what decides cold starts and waits, with the engine's own code wherever it is
host logic: each instance runs the engine's residency core (`plora_jax.lora.residency`: the
page allocator with its placement, eviction order and layouts, the host cache, the counters,
policy decisions applied exactly as the engine applies them) on a virtual clock, with a
`SimulatedTransfer` in place of the transfer thread; the policies are the `plora_jax.policies`
objects the live engine runs, fed the simulated clock (`PoolView.now`, `observe`'s time,
`Predictive.step` once per interval). Costs come from a `Calibration` measured on the live
engine (`benchmarks.replay --mode live` writes one), or from a GPU profile:

- an engine step decodes one token for every running row and prefills one chunk of at most
  `max_num_batched_tokens` tokens over at most `max_prefill_seqs` rows; it lasts
  `decode_base_s + decode_row_s * rows + prefill_token_s * tokens` (+ `prefill_base_s` if it
  prefills), plus `decode_adapter_row_s` per row and `prefill_adapter_token_s` per token that
  runs an adapter;
- admission follows the engine scheduler's rules: arrival order, a free decode row needed, and
  a request whose adapter is not on the device starts its load and is passed over, so later
  requests go first (asynchronous loads); with `adapter_loads="sync"` (S-LoRA as released) the
  step waits for the load instead, and every running row waits with it;
- one transfer channel per instance serves demand loads, then prefetches, then host reads; a
  load lasts `load_base_s + bytes / h2d_bytes_per_s`, plus `bytes / disk_bytes_per_s` when the
  adapter is not in the host cache; a host read lasts `bytes / disk_bytes_per_s`; a finished
  load is committed at the next step boundary (or when its completion event runs).

Instances (`instances.InstancePool`) start on demand after `instance_start_s` and stop after
`keep_alive_s` idle; each has its own pool and its own policy object.

A request is a cold start if its adapter was not committed on its instance when the request
first asked for it; its cold-start latency is the time from that moment until the adapter was
there (the engine's `adapter_wait_s`). The simulator is deterministic.

What still differs from a live run: the step loop here is a model of the engine's scheduler, not
the `Scheduler` itself (no KV-cache capacity, so no preemption, no packing or padding of
prefill chunks); host time beyond what the calibrated step times contain (tokenization, the
one-step-late read of sampled tokens, the transfer thread's CPU share) is not modelled; with a
calibration whose `disk_bytes_per_s` is 0, as a live one is, disk reads are inside the per-byte
load cost and host reads take no time.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..buckets import cdiv
from ..config import EngineConfig
from ..lora import HostCache, Job, PagePool, Registry, Residency, SimulatedTransfer, VirtualClock
from ..lora.transfer import HOST
from ..metrics import ADAPTER_COUNTERS, adapter_mem_util, adapter_pool_fill
from ..names import BASELINE_POLICY
from ..policies import Policy
from .instances import InstancePool
from .report import RequestRecord, Run, summarize
from .workload import TraceRequest, Workload, workload_policy


@dataclass(frozen=True)
class Calibration:
    """Costs of one engine on one machine (seconds, bytes)."""

    source: str = "hand"  # where the figures come from (a machine and a command, or "hand")
    decode_base_s: float = 0.02  # a decode step's fixed cost
    decode_row_s: float = 0.001  # added per decoding row
    prefill_base_s: float = 0.0  # a prefill chunk's fixed cost (added to a step that prefills)
    prefill_token_s: float = 0.0005  # per prefilled token
    load_base_s: float = 0.01  # fixed cost of one adapter load (placement, commit)
    h2d_bytes_per_s: float = 2e9  # host to device copy
    disk_bytes_per_s: float = 5e8  # disk read into the host cache (0: already counted in h2d_bytes_per_s)
    decode_adapter_row_s: float = 0.0  # added per decoding row that runs an adapter
    prefill_adapter_token_s: float = 0.0  # added per prefilled token that runs an adapter
    instance_start_s: float = 20.0  # an instance from zero to warm (params and executables from caches)
    bytes_per_rank: int = 0  # device bytes one rank row of an adapter occupies (all layers, projections)

    def step_s(self, decode_rows: int, prefill_tokens: int, adapter_rows: int = 0, adapter_tokens: int = 0) -> float:
        """A step's duration; `adapter_rows` of the decode rows and `adapter_tokens` of the
        prefill tokens run an adapter (its pages' cost comes on top of the base model's)."""
        t = self.decode_base_s + self.decode_row_s * decode_rows if decode_rows else 0.0
        t += self.decode_adapter_row_s * adapter_rows + self.prefill_adapter_token_s * adapter_tokens
        if prefill_tokens:
            t += self.prefill_base_s + self.prefill_token_s * prefill_tokens
            t = max(t, self.decode_base_s)  # a step has at least one launch's fixed cost
        return t

    def load_s(self, nbytes: int, on_host: bool) -> float:
        t = self.load_base_s + nbytes / self.h2d_bytes_per_s
        return t if on_host or self.disk_bytes_per_s <= 0 else t + nbytes / self.disk_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SimConfig:
    """A simulation's settings: every instance's engine settings (the `EngineConfig` a live engine
    runs with, so a live run and its simulation share one config) and the serverless ones. The
    simulator reads the scheduling fields (`max_num_seqs`, `max_num_batched_tokens`,
    `max_prefill_seqs`), the adapter pool's (`max_loras`, `lora_pool_pages`, `page_rows`,
    `max_lora_rank`, `layout`), `host_cache_mb`, `max_prefetch_inflight` and `adapter_loads`."""

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lora_pool_pages=64, host_cache_mb=2.0**20))
    instances: int = 1  # most instances at once
    min_instances: int = 1  # instances kept warm (0: scale to zero)
    keep_alive_s: float = 600.0  # an idle instance above min_instances stops after this long
    prewarm: bool = True  # a forecasting policy may start an instance ahead of demand

    def __post_init__(self):
        if self.engine.lora_pool_pages < 2:
            raise ValueError("SimConfig.engine.lora_pool_pages must be set (>= 2): the simulator sizes pools in pages")

    @property
    def pool_pages(self) -> int:
        return self.engine.lora_pool_pages

    @property
    def host_cache_bytes(self) -> int:
        return int(self.engine.host_cache_mb * 2**20)


@dataclass(eq=False)
class SimRequest:
    index: int
    trace: TraceRequest
    arrival: float
    instance: int = -1
    prefilled: int = 0  # prompt tokens computed
    generated: int = 0
    asked_at: float | None = None  # first time it asked for its adapter
    adapter_ready: float | None = None
    cold: bool = False
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    instance_wait: float = 0.0  # waited for its instance to start


class SimInstance:
    """One engine: the engine's residency core (pool, host cache, transfers, counters) on a
    virtual clock, its queues, and its policy."""

    def __init__(self, sim: Simulator, index: int, policy: Policy):
        c, cal = sim.config.engine, sim.calibration
        self.sim, self.index, self.policy = sim, index, policy
        self.clock = VirtualClock()
        registry = Registry(
            None, "float32", c.max_lora_rank, c.page_rows, ("all",), c.layout, sim.config.pool_pages - 1, sim.page_bytes
        )
        for name, rank in sim.workload.ranks.items():
            registry.insert(registry.entry(name, None, rank, ("all",), rank * cal.bytes_per_rank))
        pages = PagePool(sim.config.pool_pages, c.max_loras + 1, cdiv(c.max_lora_rank, c.page_rows), c.layout)
        transfer = SimulatedTransfer(self.clock, self._transfer_s)
        self.core = Residency(
            registry, pages, HostCache(sim.config.host_cache_bytes), transfer, self.clock, c.max_prefetch_inflight
        )
        self.core.free_when_unused = policy.free_when_unused
        sim.cores.append(self.core)
        self.pages = pages
        self.transfer = transfer
        self._load_event: float | None = None  # the "load_done" event pushed and not yet run
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy_until: float | None = None  # end of the step in progress
        self.ready_at = 0.0
        self.idle_since = 0.0
        self.stopped = False

    def _transfer_s(self, job: Job) -> float:
        cal = self.sim.calibration
        if job.kind == HOST:  # a read into the host cache only
            return job.entry.host_bytes / cal.disk_bytes_per_s if cal.disk_bytes_per_s > 0 else 0.0
        return cal.load_s(job.entry.device_bytes, on_host=job.source is not None)

    # --- adapter tiers (the residency core) ---------------------------------------------
    def at(self, now: float) -> None:
        """Bring the instance's clock to `now` (never back: a synchronous load may be ahead)."""
        self.clock.advance_to(now)

    def _schedule_transfer(self) -> None:
        t = self.transfer.next_finish()
        if t is not None and t != self._load_event:
            self._load_event = t
            self.sim.push(t, "load_done", self.index)

    def commit(self, now: float) -> None:
        """Take back the finished transfers (at a step boundary, as the engine's poll does)."""
        self.at(now)
        self._load_event = None
        self.core.collect()
        self._schedule_transfer()

    def acquire(self, request: SimRequest, now: float) -> bool:
        adapter = request.trace.adapter
        self.at(now)
        first = request.asked_at is None
        if first:
            request.asked_at = now
            request.cold = self.core.residency(adapter) != "device"
        slot = self.core.acquire(adapter, first=first)
        self._schedule_transfer()
        if slot is None:
            return False  # async: it waits; sync: the caller stalls the step until the load commits
        if request.adapter_ready is None:
            request.adapter_ready = now
        return True

    def release(self, request: SimRequest) -> None:
        adapter = request.trace.adapter
        self.core.release(adapter, wanted=any(r.trace.adapter == adapter for r in self.waiting))

    def wait_for(self, adapter: str) -> float:
        """A synchronous load: block (on the virtual clock) until `adapter` is on the device;
        returns when that was."""
        self.core.collect_for(adapter)
        self._schedule_transfer()
        return self.clock()

    # --- policy -------------------------------------------------------------------------
    def decide(self, now: float) -> None:
        self.at(now)
        view = self.core.view(now, tuple(r.trace.adapter for r in self.waiting))
        self.core.apply(self.policy.decide(view))
        self._schedule_transfer()

    # --- one engine step ----------------------------------------------------------------
    def step(self, now: float) -> None:
        """Start a step at `now` if there is work; schedules its end."""
        self.commit(now)
        c, cal = self.sim.config.engine, self.sim.calibration
        decode = [r for r in self.running if r.prefilled >= r.trace.prompt_tokens]
        prefill, budget = [], c.max_num_batched_tokens
        candidates = [r for r in self.running if r.prefilled < r.trace.prompt_tokens] + list(self.waiting)
        stall = 0.0
        for request in candidates:
            if budget <= 0 or len(prefill) >= c.max_prefill_seqs:
                break
            if request.admitted is None:
                if len(self.running) >= c.max_num_seqs:
                    break
                if not self.acquire(request, now + stall):
                    if c.adapter_loads == "sync" and self.core.is_loading(request.trace.adapter):
                        # S-LoRA: the load runs inside this step; every row waits for it
                        stall = max(stall, self.wait_for(request.trace.adapter) - now)
                        if not self.acquire(request, now + stall):
                            continue
                    else:
                        continue
                self.waiting.remove(request)
                self.running.append(request)
                request.admitted = now + stall
            chunk = min(request.trace.prompt_tokens - request.prefilled, budget)
            prefill.append((request, chunk))
            budget -= chunk
        if not decode and not prefill:
            self.busy_until = None
            if stall:
                self.sim.push(now + stall, "step", self.index)
            return
        adapter_rows = sum(r.trace.adapter is not None for r in decode)
        adapter_tokens = sum(chunk for r, chunk in prefill if r.trace.adapter is not None)
        tokens = sum(chunk for _, chunk in prefill)
        end = now + stall + cal.step_s(len(decode), tokens, adapter_rows, adapter_tokens)
        self.busy_until = end
        self.sim.push(end, "step_end", self.index, (decode, prefill))

    def step_end(self, now: float, plan) -> None:
        decode, prefill = plan
        for request in decode:
            request.generated += 1
        for request, chunk in prefill:
            request.prefilled += chunk
            if request.prefilled >= request.trace.prompt_tokens:
                request.first_token = now
                request.generated += 1
        for request in decode + [r for r, _ in prefill]:
            if request.generated >= request.trace.output_tokens and request.finished is None:
                request.finished = now
                self.running.remove(request)
                self.release(request)
                self.sim.finished += 1
        self.busy_until = None
        if self.running or self.waiting:
            self.step(now)
        else:
            self.idle_since = now
            self.sim.instance_idle(self, now)

    def wake(self, now: float) -> None:
        if self.busy_until is None and not self.stopped and now >= self.ready_at:
            self.step(now)


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
        self.cores: list[Residency] = []  # every instance's residency core, stopped ones included
        self.seq = itertools.count()
        self.events: list = []
        self.finished = 0
        self.requests = [SimRequest(i, r, r.arrival_s) for i, r in enumerate(workload.requests)]
        self.mem_samples: list[tuple[float, float, float]] = []  # (time, live/reserved, reserved/pool)
        self.now = 0.0
        self.pool = InstancePool(self, make_policy, SimInstance)

    def push(self, when: float, kind: str, instance: int, payload=None) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, instance, payload))

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
        for request in self.requests:
            self.push(request.arrival, "arrival", -1, request)
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
            elif kind == "step":
                self.pool.instances[index].wake(now)
            elif kind == "step_end":
                self.pool.instances[index].step_end(now, payload)
            elif kind == "load_done":
                inst = self.pool.instances[index]
                inst.commit(now)
                inst.wake(now)
            elif kind == "instance_ready":
                self.pool.ready(index, now)
            elif kind == "keep_alive":
                self.pool.expire(index, now)
        return self

    def forecast_step(self, policy: Policy) -> None:
        policy.step()  # a forecaster's interval on the simulated clock (a no-op for the others)

    def records(self) -> list[RequestRecord]:
        return [
            RequestRecord(
                r.arrival,
                r.first_token,
                r.finished,
                r.cold,
                (r.adapter_ready - r.asked_at) if r.adapter_ready is not None and r.asked_at is not None else 0.0,
                r.trace.output_tokens,
                r.instance_wait,
            )
            for r in self.requests
        ]

    def result(self) -> Run:
        memory = [(t, u) for t, u, _ in self.mem_samples]
        util = float(np.mean([u for _, u in memory])) if memory else 0.0
        waits = self.pool.start_waits
        extra = {
            "instance_starts": self.pool.starts,
            "instance_prewarms": self.pool.prewarms,
            "instance_stops": self.pool.stops,
            "instance_start_wait_mean_s": float(np.mean(waits)) if waits else 0.0,
            "compiles_after_warmup": 0,
        }
        records = self.records()
        return Run(summarize(records, self.counters(), util, extra), records, memory)

    def counters(self) -> dict:
        """The adapter counters (`plora_jax.metrics`) summed over every instance that ran."""
        total = dict.fromkeys(ADAPTER_COUNTERS, 0)
        for core in self.cores:
            stats = core.stats()  # the counters, host-cache evictions included
            for name in total:
                total[name] += stats[name]
        return total


def simulate(
    workload: Workload,
    policy: str,
    config: SimConfig,
    calibration: Calibration,
    predictor_checkpoint: str = "",
) -> Run:
    """Replay `workload` under `policy` in simulation."""
    if policy == BASELINE_POLICY:
        config = replace(config, engine=replace(config.engine, adapter_loads="sync"))
    interval = workload.config.seconds_per_minute
    sim: Simulator | None = None  # the factory runs inside sim.run(), after the assignment below
    factory = lambda: workload_policy(policy, workload, interval, lambda: sim.now, predictor_checkpoint)
    sim = Simulator(workload, factory, config, calibration, interval)
    return sim.run().result()
