"""The gate between the scheduler and the adapter tiers: a request is admitted only with its
adapter on the device, pinned.

The scheduler calls `acquire` when it would admit a request that runs an adapter and `release`
when the request leaves (finished, aborted or preempted). The gate keeps the request's part of
the bookkeeping (when it first asked, whether that first ask was a cold start, how long it
waited) and asks the residency core for the rest. The live engine (`core.EngineCore`) and the
simulator (`plora_jax.serverless.sim`) run this same code; they differ only in the clock and in
what a synchronous load does (`wait_for`): live it blocks on the transfer thread and commits the
copy into the device pool, simulated it moves the virtual clock to the load's end.

Loads are asynchronous by default: a request whose adapter is loading is passed over, so later
requests go first. With `sync` (S-LoRA as released, the baseline of the paper's claims) the
load happens inside the step: the whole batch waits for it, a read from disk included. With
`wait_host` (the default of asynchronous loads) a load that is only a copy from the host cache
to the device is waited for at admission: the batch waits one copy (milliseconds on a GPU),
and the request joins the step being planned instead of the one after it, so an asynchronous
cold start from the host is never slower than a synchronous one. Every wait counts in
`stall_s` and `stall_row_s`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..lora.residency import Residency
from .scheduler import Request

Failures = list[tuple[str, BaseException]]


class AdapterGate:
    def __init__(
        self,
        core: Residency,
        clock: Callable[[], float],
        waiting: Callable[[], Iterable[Request]],
        wait_for: Callable[[str], Failures],
        sync: bool = False,
        running: Callable[[], int] = lambda: 0,
        wait_host: bool = False,
    ):
        self.core = core
        self.clock = clock
        self.waiting = waiting  # the requests waiting for admission (the scheduler's queue)
        self.wait_for = wait_for  # block until a load in flight is committed; its failures
        self.sync = sync
        self.wait_host = wait_host  # wait for a load that is a copy from the host cache (module docstring)
        self.running = running  # how many requests the scheduler runs (a synchronous load holds them all)
        self.unservable: list[Request] = []  # asked for an adapter removed after they were accepted
        self.failures: Failures = []  # synchronous loads that failed inside schedule(), reported at the next poll
        self.stall_s = 0.0  # seconds spent in synchronous loads, in all
        self.sync_waits = 0  # synchronous waits for a load (one per load a step waited on)
        self.stall_row_s = 0.0  # those seconds times the running requests each held up (`metrics`: stall_s)

    def arrive(self, request: Request) -> None:
        """Scheduler callback as a request is queued: whether it is a cold start is decided here,
        by where its adapter is before anything its arrival triggers (a policy's prefetch)."""
        if request.adapter_counted or request.adapter not in self.core.entries:
            return
        request.adapter_tier = self.core.arrive(request.adapter)
        request.adapter_cold = request.adapter_tier != "device"
        request.adapter_counted = True

    def acquire(self, request: Request) -> bool:
        """Scheduler callback: put the request's adapter on the device and pin it; False: wait."""
        core = self.core
        if request.adapter not in core.entries:  # removed after the request was accepted
            if request not in self.unservable:
                self.unservable.append(request)
            return False
        first_attempt = request.adapter_wait_start is None
        if first_attempt:
            request.adapter_wait_start = self.clock()
        self.arrive(request)  # a request queued without the callback is counted at its first attempt
        slot = core.acquire(request.adapter, first=False)
        at_once = first_attempt and slot is not None  # on the device at its first attempt: waited 0
        if slot is None and self._waits_for(request.adapter):
            began, held = self.clock(), self.running()
            failures = self.wait_for(request.adapter)
            self.stall_s += self.clock() - began
            self.sync_waits += 1
            self.stall_row_s += (self.clock() - began) * held
            self.failures += failures  # the queue is not ours to edit inside schedule()
            if all(name != request.adapter for name, _ in failures):
                slot = core.acquire(request.adapter, first=False)
        if slot is None:
            return False
        request.adapter_slot = slot
        if not at_once:  # waited until its adapter was on the device, not until a batch row freed
            landed = min(self.clock(), core.ready_at.get(request.adapter, self.clock()))
            request.adapter_wait += max(0.0, landed - request.adapter_wait_start)
        request.adapter_wait_start = None
        return True

    def _waits_for(self, name: str) -> bool:
        job = self.core.loading.get(name)
        return job is not None and (self.sync or (self.wait_host and job.source is not None))

    def reclaim(self, num_blocks: int) -> bool:
        """Scheduler callback, short of KV blocks: evict unused adapters for theirs (a unified
        budget); whether `num_blocks` are free now."""
        return self.core.reclaim(num_blocks)

    def waits_for_memory(self, request: Request) -> bool:
        """Scheduler callback after `acquire` refused: whether the request's adapter could not be
        placed for device memory it shares with the KV cache (neither placed nor loading)."""
        core, name = self.core, request.adapter
        placed = core.pages.get(name) is not None or core.is_loading(name)
        return core.pages.kv is not None and name in core.entries and not placed

    def release(self, request: Request) -> None:
        """Scheduler callback: unpin the request's adapter."""
        name = request.adapter
        # Only reactive freeing asks whether a waiting request needs the adapter: skip the queue
        # scan otherwise. The request itself counts while it is queued: its admission fell
        # through (no KV blocks) and it will ask again.
        wanted = self.core.free_when_unused and any(r.adapter == name for r in self.waiting())
        self.core.release(name, wanted)
        request.adapter_slot = 0

    def take_failures(self, polled: Failures) -> Failures:
        """The failed loads to report now: those of the synchronous waits since the last poll,
        then `polled`."""
        failures, self.failures = self.failures + polled, []
        return failures
