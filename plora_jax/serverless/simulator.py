"""A discrete-event simulator of the serverless multi-LoRA engine, for whole trace windows.

What it models is what decides cold starts and waits, with the engine's own parts where they
are host logic: the adapter pool is the engine's `PagePool` (same placement, eviction order and
layouts), and the policies are the `plora_jax.policies` objects the live engine runs, fed a
simulated clock (`PoolView.now`, `observe`'s time, `Predictive.step` once per interval). Costs
come from a `Calibration` measured on the live engine (`benchmarks.replay --mode live` writes one),
or from a GPU profile:

- an engine step decodes one token for every running row and prefills one chunk of at most
  `max_num_batched_tokens` tokens over at most `max_prefill_seqs` rows; it lasts
  `decode_base_s + decode_row_s * rows + prefill_token_s * tokens` (+ `prefill_base_s` if it
  prefills);
- admission is the engine scheduler's: arrival order, a free decode row needed, and a request
  whose adapter is not on the device starts its load and is passed over, so later requests go
  first (asynchronous loads); with `adapter_loads="sync"` (S-LoRA as released) the step waits
  for the load instead, and every running row waits with it;
- one transfer channel per instance serves demand loads before prefetches; a load lasts
  `load_base_s + bytes / h2d_bytes_per_s`, plus `bytes / disk_bytes_per_s` when the adapter is
  not in the host cache (an LRU under `host_cache_bytes`, where every loaded adapter stays);
  a finished load is committed at the next step boundary, as the engine's poll does.

Instances (`instances.InstancePool`) start on demand after `instance_start_s` and stop after
`keep_alive_s` idle; each has its own pool and its own policy object.

A request is a cold start if its adapter was not committed on its instance when the request
first asked for it; its cold-start latency is the time from that moment until the adapter was
there (the engine's `adapter_wait_s`). The simulator is deterministic.

Not modelled: KV-cache capacity (so no preemption), sampling and host overheads beyond what the
calibrated step times contain, and the time of a policy's host-cache reads (a host prefetch
lands at once; with a calibration whose `disk_bytes_per_s` is 0, as a live one is, disk reads are
inside the per-byte load cost anyway).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType

import numpy as np

from ..buckets import cdiv
from ..lora_pool import PagePool
from ..metrics import adapter_mem_util, adapter_pool_fill
from ..names import BASELINE_POLICY
from ..policies import Decision, Policy, PoolView, Predictive
from .report import RequestRecord, Run, summarize
from .workload import TraceRequest, Workload


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
    instance_start_s: float = 20.0  # an instance from zero to warm (params and executables from caches)
    bytes_per_rank: int = 0  # device bytes one rank row of an adapter occupies (all layers, projections)

    def step_s(self, decode_rows: int, prefill_tokens: int) -> float:
        t = self.decode_base_s + self.decode_row_s * decode_rows if decode_rows else 0.0
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
    """The engine and serverless settings a simulation runs with (mirrors EngineConfig fields)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_seqs: int = 4
    max_loras: int = 8  # adapter slots per instance
    pool_pages: int = 64  # pages per instance (page 0 reserved, as in the engine)
    page_rows: int = 8
    max_lora_rank: int = 64
    layout: str = "paged"
    host_cache_bytes: int = 1 << 40  # host cache per instance (default: everything fits)
    max_prefetch_inflight: int = 2
    adapter_loads: str = "async"  # "async" | "sync" (S-LoRA)
    instances: int = 1  # most instances at once
    min_instances: int = 1  # instances kept warm (0: scale to zero)
    keep_alive_s: float = 600.0  # an idle instance above min_instances stops after this long
    prewarm: bool = True  # a forecasting policy may start an instance ahead of demand


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
    """One engine: its pool, host cache, transfer channel, queues and policy."""

    def __init__(self, sim: Simulator, index: int, policy: Policy):
        c = sim.config
        self.sim, self.index, self.policy = sim, index, policy
        self.max_pages = cdiv(c.max_lora_rank, c.page_rows)
        self.pages = PagePool(c.pool_pages, c.max_loras + 1, self.max_pages, c.layout)
        self.priority: dict[str, float] = {}
        self.pages.priority = lambda name: self.priority.get(name, 0.0)
        self.host: OrderedDict[str, int] = OrderedDict()
        self.loading: dict[str, bool] = {}  # adapter -> prefetch?, until committed
        self.done: dict[str, float] = {}  # adapter -> time its transfer finishes
        self.channel_free = 0.0
        self.channel_queue: list = []  # heap of (kind, seq, adapter)
        self.prefetched: set[str] = set()
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy_until: float | None = None  # end of the step in progress
        self.ready_at = 0.0
        self.idle_since = 0.0
        self.stopped = False

    # --- adapter tiers ------------------------------------------------------------------
    def nbytes(self, adapter: str) -> int:
        rank = self.sim.workload.ranks[adapter]
        rows = self.max_pages * self.sim.config.page_rows if self.pages.layout == "contiguous" else rank
        return cdiv(rows, self.sim.config.page_rows) * self.sim.config.page_rows * self.sim.calibration.bytes_per_rank

    def committed(self, adapter: str) -> bool:
        return self.pages.get(adapter) is not None and adapter not in self.loading

    def start_load(self, adapter: str, now: float, prefetch: bool, evict_below: float | None = None) -> bool:
        sim, rank = self.sim, self.sim.workload.ranks[adapter]
        live = rank * sim.calibration.bytes_per_rank
        placed = self.pages.allocate(adapter, cdiv(rank, sim.config.page_rows), live, evict_below)
        if placed is None:
            return False
        for other in placed[1]:
            self._evicted(other)
        self.pages.pin(adapter)  # a loading adapter is never evicted (as in the engine)
        self.loading[adapter] = prefetch
        if prefetch:
            self.prefetched.add(adapter)
            sim.counters["prefetch_issued"] += 1
        heapq.heappush(self.channel_queue, (1 if prefetch else 0, next(sim.seq), adapter))
        self._run_channel(now)
        return True

    def _run_channel(self, now: float) -> None:
        """Start the next queued transfer if the channel is free (demand loads first)."""
        while self.channel_queue and self.channel_free <= now:
            _, _, adapter = heapq.heappop(self.channel_queue)
            if adapter not in self.loading or adapter in self.done:
                continue
            nbytes = self.nbytes(adapter)
            on_host = adapter in self.host
            end = max(now, self.channel_free) + self.sim.calibration.load_s(nbytes, on_host)
            self.sim.counters["bytes_host_to_device"] += nbytes
            if not on_host:
                self.sim.counters["bytes_disk_to_host"] += nbytes
            self.host_add(adapter, nbytes)
            self.channel_free = end
            self.done[adapter] = end
            self.sim.push(end, "load_done", self.index)

    def host_add(self, adapter: str, nbytes: int) -> None:
        self.host[adapter] = nbytes
        self.host.move_to_end(adapter)
        while sum(self.host.values()) > self.sim.config.host_cache_bytes and len(self.host) > 1:
            self.host.popitem(last=False)

    def commit(self, now: float) -> None:
        for adapter, end in list(self.done.items()):
            if end <= now:
                del self.done[adapter]
                if self.loading.pop(adapter, None) is not None:
                    self.pages.unpin(adapter)
        self._run_channel(now)

    def _evicted(self, adapter: str) -> None:
        if adapter in self.prefetched:
            self.prefetched.discard(adapter)
            self.sim.counters["prefetch_wasted"] += 1

    def acquire(self, request: SimRequest, now: float) -> bool:
        adapter = request.trace.adapter
        counters = self.sim.counters
        if request.asked_at is None:
            request.asked_at = now
            request.cold = not self.committed(adapter)
            counters["cold_starts" if request.cold else "device_hits"] += 1
            if adapter in self.prefetched:
                self.prefetched.discard(adapter)
                counters["prefetch_used"] += 1
                counters["prefetch_hits"] += not request.cold
        if not self.committed(adapter):
            if adapter not in self.loading and not self.start_load(adapter, now, prefetch=False):
                return False
            return False  # async: it waits; sync: the caller stalls the step until the load commits
        self.pages.pin(adapter)
        if request.adapter_ready is None:
            request.adapter_ready = now
        return True

    def release(self, request: SimRequest) -> None:
        adapter = request.trace.adapter
        self.pages.unpin(adapter)
        res = self.pages.get(adapter)
        if res is None or res.pins or adapter in self.loading:
            return
        if self.policy.free_when_unused and not any(r.trace.adapter == adapter for r in self.waiting):
            self.pages.evict(adapter)
            self._evicted(adapter)

    # --- policy -------------------------------------------------------------------------
    def decide(self, now: float) -> None:
        view = PoolView(
            now=now,
            registered=self.sim.adapter_names,
            on_device=frozenset(self.pages.resident),
            on_host=frozenset(self.host),
            pinned=frozenset(n for n, r in self.pages.resident.items() if r.pins),
            queued=tuple(r.trace.adapter for r in self.waiting),
            adapter_bytes=self.sim.adapter_bytes[self.pages.layout],
            device_bytes=(self.pages.num_pages - 1) * self.sim.page_bytes,
            device_slots=self.pages.usable_slots,
            host_bytes=self.sim.config.host_cache_bytes,
        )
        decision: Decision = self.policy.decide(view)
        self.priority = {n: float(p) for n, p in decision.priority.items()}
        for adapter in decision.evict:
            res = self.pages.get(adapter)
            if res is not None and not res.pins and adapter not in self.loading:
                self.pages.evict(adapter)
                self._evicted(adapter)
        inflight = sum(self.loading.values())
        for adapter in decision.device:
            if inflight >= self.sim.config.max_prefetch_inflight:
                break
            if self.pages.get(adapter) is None and self.start_load(
                adapter, now, prefetch=True, evict_below=self.priority.get(adapter, 0.0)
            ):
                inflight += 1
        for adapter in decision.host[: self.sim.config.max_prefetch_inflight]:
            if adapter not in self.host:
                nbytes = self.nbytes(adapter)
                self.sim.counters["bytes_disk_to_host"] += nbytes
                self.host_add(adapter, nbytes)

    # --- one engine step ----------------------------------------------------------------
    def step(self, now: float) -> None:
        """Start a step at `now` if there is work; schedules its end."""
        self.commit(now)
        c, cal = self.sim.config, self.sim.calibration
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
                    if c.adapter_loads == "sync" and request.trace.adapter in self.loading:
                        # S-LoRA: the load runs inside this step; every row waits for it
                        stall = max(stall, self.done.get(request.trace.adapter, now) - now)
                        self.commit(now + stall)
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
        end = now + stall + cal.step_s(len(decode), sum(chunk for _, chunk in prefill))
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
        from .instances import InstancePool

        if calibration.bytes_per_rank <= 0:
            raise ValueError("calibration.bytes_per_rank must be > 0 (device bytes of one rank row)")
        self.workload, self.config, self.calibration = workload, config, calibration
        self.interval_s = interval_s if interval_s is not None else workload.config.seconds_per_minute
        self.adapter_names = tuple(workload.ranks)
        self.page_bytes = config.page_rows * calibration.bytes_per_rank
        max_pages = cdiv(config.max_lora_rank, config.page_rows)
        self.adapter_bytes = {
            "paged": MappingProxyType(
                {n: cdiv(r, config.page_rows) * self.page_bytes for n, r in workload.ranks.items()}
            ),
            "contiguous": MappingProxyType({n: max_pages * self.page_bytes for n in workload.ranks}),
        }
        self.counters = dict.fromkeys(
            (
                *("cold_starts", "device_hits", "prefetch_issued", "prefetch_used", "prefetch_hits", "prefetch_wasted"),
                *("bytes_host_to_device", "bytes_disk_to_host"),
            ),
            0,
        )
        self.seq = itertools.count()
        self.events: list = []
        self.finished = 0
        self.requests = [SimRequest(i, r, r.arrival_s) for i, r in enumerate(workload.requests)]
        self.mem_samples: list[tuple[float, float, float]] = []  # (time, live/reserved, reserved/pool)
        self.now = 0.0
        self.pool = InstancePool(self, make_policy)

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
        if isinstance(policy, Predictive):
            policy.step()

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
        return Run(summarize(records, self.counters, util, extra), records, memory)


def policy_for(
    name: str,
    workload: Workload,
    interval_s: float,
    clock: Callable[[], float],
    predictor_checkpoint: str = "",
) -> Policy:
    """The replay's policy `name` (`reactive_sync` is `reactive`; the engine makes its loads
    synchronous). Time-compressed: one policy interval is one trace minute, the forecaster's
    time of day follows the trace clock (`clock()`: seconds since the replay started)."""
    from ..policies import make_policy
    from ..policies.predictive import EwmaForecaster

    base = "reactive" if name == BASELINE_POLICY else name
    if base == "oracle":
        return make_policy("oracle", interval_s, arrivals=workload.arrivals())
    if base == "predictive":
        if predictor_checkpoint == "ewma":
            forecaster = EwmaForecaster()
        else:
            from plora_jax.predictor.forecaster import LstmForecaster

            spm = workload.config.seconds_per_minute
            minute = lambda: workload.first_minute + clock() / spm
            forecaster = LstmForecaster(predictor_checkpoint or None, interval_minutes=1.0, minute_of_day=minute)
        return make_policy("predictive", interval_s, forecaster=forecaster)
    return make_policy(base, interval_s)


def simulate(
    workload: Workload,
    policy: str,
    config: SimConfig,
    calibration: Calibration,
    predictor_checkpoint: str = "",
) -> Run:
    """Replay `workload` under `policy` in simulation."""
    if policy == BASELINE_POLICY:
        config = replace(config, adapter_loads="sync")
    interval = workload.config.seconds_per_minute
    sim: Simulator | None = None  # the factory runs inside sim.run(), after the assignment below
    factory = lambda: policy_for(policy, workload, interval, lambda: sim.now, predictor_checkpoint)
    sim = Simulator(workload, factory, config, calibration, interval)
    return sim.run().result()
