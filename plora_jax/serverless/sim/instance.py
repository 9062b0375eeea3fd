"""One simulated engine: the engine's host logic on a virtual clock, a cost profile for the device.

What runs here is the engine's own code: the `Scheduler` (admission, packing, chunking, KV
blocks, preemption), the `AdapterGate` between it and the adapter tiers, the residency core
(`plora_jax.lora.residency`) with a `SimulatedTransfer`, `OutputProcessor.append` for the stop
rules, and the residency policy object. What is simulated is time: a step lasts what the cost
profile (`costs.Calibration.step_s`) says of its `StepShape`; a transfer what `load_s` says.

The iteration is the engine loop's (`EngineCore._iterate`), in its order: commit finished
transfers, schedule (a synchronous load moves the clock inside it, as it blocks the live loop),
dispatch the plan, then read the previous plan's tokens at the current time. A plan dispatched
at t runs until t + its cost; the next iteration starts then. With nothing to dispatch but
tokens just read, the loop goes again at once; with nothing to read and work waiting (a load in
flight), it waits for the load's end.
"""

from __future__ import annotations

from ...buckets import cdiv
from ...engine.adapter_gate import AdapterGate
from ...engine.kv_blocks import BlockAllocator
from ...engine.outputs import OutputProcessor
from ...engine.scheduler import Request, Scheduler, Status, StepPlan
from ...engine.step_log import shape_of
from ...lora import HostCache, Job, KvShare, PagePool, Registry, Residency, SimulatedTransfer, VirtualClock
from ...lora.host_cache import HostCopy
from ...lora.transfer import FETCH, HOST
from ...policies import Policy


class SimInstance:
    def __init__(self, sim, index: int, policy: Policy):
        c, cal = sim.config.engine, sim.calibration
        self.sim, self.index, self.policy = sim, index, policy
        self.clock = VirtualClock()
        registry = Registry(
            None, "float32", c.max_lora_rank, c.page_rows, ("all",), c.layout, sim.config.pool_pages - 1, sim.page_bytes
        )
        for name, rank in sim.workload.ranks.items():
            entry = registry.entry(name, None, rank, ("all",), rank * cal.bytes_per_rank)
            if sim.config.adapter_store == "store":
                entry.source = f"store://{name}"  # fetched into this instance's node cache on first use
            registry.insert(entry)
        blocks = BlockAllocator(c.num_kv_blocks)  # the scheduler's; the adapter pool's too when unified
        kv = KvShare(blocks, sim.page_bytes, sim.kv_block_bytes) if sim.unified else None
        max_pages = cdiv(c.max_lora_rank, c.page_rows)
        self.pages = PagePool(sim.config.pool_pages, c.max_loras + 1, max_pages, c.layout, kv)
        self.transfer = SimulatedTransfer(self.clock, self._transfer_s)
        host = HostCache(sim.config.host_cache_bytes)
        if sim.config.adapters_on_host:
            for name, entry in registry.entries.items():
                host.put(name, HostCopy(None, None, entry.host_bytes))
            if len(host) < len(registry.entries):
                raise ValueError(
                    f"SimConfig.adapters_on_host: a host cache of {c.host_cache_mb:g} MB holds {len(host)} "
                    f"of the {len(registry.entries)} adapters"
                )
        disk = HostCache(sim.config.node_cache_bytes)
        self.core = Residency(registry, self.pages, host, disk, self.transfer, self.clock, c.max_prefetch_inflight)
        self.core.free_when_unused = policy.free_when_unused
        self.gate = AdapterGate(
            self.core,
            self.clock,
            lambda: self.scheduler.waiting,
            self._wait_for,
            c.adapter_loads == "sync" or policy.sync_loads,
            lambda: len(self.scheduler.running),
            c.wait_host_copies,
        )
        self.scheduler = Scheduler.for_engine(c, sim.buckets.prefill[-1], self.gate, self.clock, blocks)
        sim.cores.append(self.core)
        sim.engines.append(self)
        self.held_s = 0.0  # seconds it had work (requests running or waiting), in all
        self._held_since: float | None = None  # when its current stretch of work began
        self.in_flight: StepPlan | None = None  # the plan dispatched last, its tokens not read yet
        self.busy_until: float | None = None  # end of the plan in flight
        self._load_event: float | None = None  # the "load_done" event pushed and not yet run
        self.ready_at = 0.0
        self.idle_since = 0.0
        self.stopped = False

    def _transfer_s(self, job: Job, stage: str) -> float:
        cal = self.sim.calibration
        if stage == FETCH:  # from the store into the node cache
            return cal.fetch_s(job.entry.live_bytes)
        if job.kind == HOST:  # a read into the host cache only
            return job.entry.host_bytes / cal.disk_bytes_per_s if cal.disk_bytes_per_s > 0 else 0.0
        return cal.load_s(job.entry.device_bytes, on_host=job.source is not None)

    def figures(self, now: float | None = None) -> dict:
        """Its stall in row-seconds (`metrics`: stall_s), and its busy seconds: the time it had
        requests running or waiting (steps, synchronous loads, and waits for asynchronous loads
        with nothing else to run), up to `now` (the simulator's time: this clock may lag it)."""
        now = max(self.clock(), now) if now is not None else self.clock()
        current = now - self._held_since if self._held_since is not None else 0.0
        gate = self.gate
        return {
            "stall_row_s": gate.stall_row_s,
            "sync_waits": gate.sync_waits,
            "sync_wait_s": gate.stall_s,
            "busy_s": self.held_s + current,
        }

    # --- what the serverless rules read -------------------------------------------------
    @property
    def load(self) -> int:
        """Requests running or waiting here."""
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def holds(self, adapter: str | None) -> bool:
        return adapter is not None and self.pages.get(adapter) is not None

    def busy(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    # --- adapter tiers ------------------------------------------------------------------
    def at(self, now: float) -> None:
        """Bring the instance's clock to `now` (never back: a synchronous load may be ahead)."""
        self.clock.advance_to(now)

    def _schedule_transfer(self) -> None:
        t = self.transfer.next_finish()
        if t is not None and t != self._load_event:
            self._load_event = t
            self.sim.push(t, "load_done", self.index)

    def _wait_for(self, adapter: str) -> list[tuple[str, BaseException]]:
        """A synchronous load (the gate's `wait_for`): the clock moves to the load's end."""
        return self.core.collect_for(adapter)[1]

    def _poll(self) -> None:
        """Take back finished transfers (the engine's `poll_adapters`); requests waiting for an
        adapter whose load failed fail with it."""
        _, polled = self.core.collect()
        for name, _ in self.gate.take_failures(polled):
            for request in [r for r in self.scheduler.waiting if r.adapter == name]:
                self.scheduler.finish(request, "abort")
                self.sim.failed += 1

    def decide(self, now: float) -> None:
        self.at(now)
        queued = tuple(r.adapter for r in self.scheduler.waiting if r.adapter is not None)
        self.core.apply(self.policy.decide(self.core.view(self.clock(), queued)))
        self._schedule_transfer()

    # --- the loop -----------------------------------------------------------------------
    def add(self, request: Request, now: float) -> None:
        self.scheduler.add(request)
        if request.adapter is not None:
            self.policy.observe(request.adapter, now)

    def wake(self, now: float) -> None:
        """An arrival, a finished load or the instance's start: iterate if the loop is idle."""
        if self.busy_until is None and not self.stopped and now >= self.ready_at:
            self.iterate(now)

    def load_done(self, now: float) -> None:
        """A transfer's end: the event is spent; a loop waiting for it runs (the engine's Wake). A
        busy loop commits it at its step's end, which also schedules the next transfer event."""
        self._load_event = None
        self.wake(now)

    def iterate(self, now: float) -> None:
        """One loop iteration at `now` (see the module docstring); repeats while it only reads."""
        was_busy, entered = self.busy(), now
        while True:
            self.at(now)
            committed = self.core.committed_pages
            self._poll()
            committed = self.core.committed_pages - committed  # a synchronous load's are the load's time
            plan = self.scheduler.schedule()
            previous, self.in_flight, self.busy_until = self.in_flight, None, None
            if plan is not None:
                core = self.core
                buckets = self.sim.buckets
                loading = bool(core.loading or core.host_jobs)
                shape = shape_of(plan, buckets.decode, buckets.prefill, loading, committed)
                self.in_flight = plan
                self.busy_until = self.clock() + self.sim.calibration.step_s(shape)
                self.sim.push(self.busy_until, "step_end", self.index)
            if previous is not None:
                self._read(previous, self.clock())
            self._schedule_transfer()
            if plan is not None or previous is None:
                break
            now = self.clock()  # tokens read, nothing dispatched: the loop goes again at once
        if self.busy() and self._held_since is None:
            self._held_since = entered
        elif not self.busy() and self._held_since is not None:
            self.held_s += self.clock() - self._held_since
            self._held_since = None
        if was_busy and not self.busy():  # only a busy loop going idle starts the keep-alive
            self.idle_since = self.clock()
            self.sim.instance_idle(self, self.idle_since)

    def _read(self, plan: StepPlan, now: float) -> None:
        """The plan's sampled tokens, read at `now` (the engine's `_process`)."""
        rows = [row.request for row in plan.decode] + [row.request for row in plan.prefill if row.final]
        for request in rows:
            if request.status is Status.FINISHED:
                continue  # a token past the end
            request.pending -= 1
            ended, _ = OutputProcessor.append(request, 0, 0.0, now)
            if ended is not None:
                self.scheduler.finish(request, ended[0])
                self.sim.finished += 1
