"""Moving adapters between tiers: the live transfers of an engine, and their simulated twin.

A `Job` is one transfer. The residency core (`residency.py`) places it (device jobs get their
pages and slot first), hands it to a `Transfer`, and takes it back from `finished` at a step
boundary. Everything a transfer produces travels in the job (`read`, `staged`, `error`,
`bytes_disk`): the transfer never writes into the registry, the host cache or the page pool,
so the owner of those (the engine loop) is their only writer.

Kinds, in the order a transfer serves them: `DEMAND` (a request waits for it), `PREFETCH` (a
policy's device prefetch), `HOST` (a policy's read into the host cache only), `DISK` (a
policy's fetch from the adapter store into the node cache only).

One queue per physical link, demand first on each, so a demand load never waits behind a
prefetch queued on its link, and a copy already in host memory never waits behind a read:
- store to node disk: a thread fetches `DISK` jobs into the node cache, below the loop's OS
  priority. The fetches that device and host jobs need run inside their reads (below); all of
  them share the node cache's `Link`, where a background fetch yields to a demand fetch
  between chunks;
- disk to host: a thread reads and lays out an adapter's folder, one job at a time, for the
  device jobs without a host copy and the host reads. Demand reads have their own thread at
  the loop's OS priority; prefetches and host reads share one below it (kind order), so on a
  host with few cores they take CPU from the steps only when it is idle;
- host to device: issued by the owner (the loop) as a non-blocking `device_put` of the commit's
  arguments (`issue`), at once for a copy already in the host cache, or when the thread hands
  back its read. `finished` hands the job back at the first step boundary after its arrays
  have landed (`jax.Array.is_ready`), so a loop with steps to run never waits on a copy; an
  idle loop waits for the oldest with `wait_landing`.

`ThreadTransfer` is the live set; `SimulatedTransfer` runs the same links on a virtual clock,
each stage of a job lasting `duration(job, stage)` seconds (from a cost profile): a job whose
adapter must come from the store (`Job.fetch`) takes the store link first, then the channel it
would take from the node. `finished(block=True)` advances the clock to the next completion, as
a blocking wait would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .host_cache import HostCopy
from .registry import AdapterEntry

log = logging.getLogger(__name__)

DEMAND, PREFETCH, HOST, DISK = 0, 1, 2, 3  # job kinds, in the order transfers serve them
FETCH, LOAD = "fetch", "load"  # a simulated job's stages: from the store to the node; onwards to its tier


@dataclass(eq=False)
class Job:
    kind: int
    name: str
    entry: AdapterEntry
    slot: int = 0
    pages: tuple[int, ...] = ()
    generation: int = 0  # the placement it was made for (page_allocator.Resident.generation)
    started: float = 0.0  # clock time it was queued
    seq: int = 0  # queue order among jobs of one kind
    source: HostCopy | None = None  # the host copy to stage from; None: read the folder
    fetch: bool = False  # not in the node cache as the owner last saw it: the store is read first
    # A fetch of the same adapter into the node cache already in flight: this job reads once it
    # lands instead of fetching again (live, the node cache's lock on the key does the same).
    after: Job | None = field(default=None, repr=False)
    ended: float | None = None  # when a simulated transfer finished it
    # Results, written by the transfer before it hands the job back:
    read: HostCopy | None = None  # the copy read from the folder for this job
    staged: tuple | None = field(default=None, repr=False)  # the commit's arguments, on the device
    error: BaseException | None = None
    bytes_disk: int = 0
    bytes_remote: int = 0  # fetched from the store for it (simulated; live, the node cache counts them)
    bytes_device: int = 0  # bytes copied to the device for it
    busy_s: float = 0.0  # seconds the transfer spent on it (not counting its wait in the queue)


class Transfer(Protocol):
    def submit(self, job: Job) -> None:
        """Queue `job` (owner thread)."""

    def finished(self, block: bool = False) -> Job | None:
        """A finished job (owner thread), or None; with `block`, wait for one if any is queued."""

    def close(self) -> None: ...


# The reader threads: a job's lane is its link and, on the disk link, whether a request waits.
DEMAND_LANE, BACKGROUND_LANE, STORE_LANE = "demand", "background", "store"
_THREAD_NAMES = {
    DEMAND_LANE: "plora-adapter-read",
    BACKGROUND_LANE: "plora-adapter-read-background",
    STORE_LANE: "plora-adapter-fetch",
}


class ThreadTransfer:
    def __init__(
        self,
        read: Callable[[AdapterEntry, bool], HostCopy],
        issue: Callable[[Job, HostCopy], tuple],
        fetch: Callable[[AdapterEntry], None],
    ):
        self.read = read  # disk to host (the thread): read(entry, demand)
        self.issue = issue  # host to device: the commit's arguments on the device, not waited on (the owner)
        self.fetch = fetch  # store to the node cache only (the store thread)
        self._jobs = {lane: queue.PriorityQueue() for lane in _THREAD_NAMES}
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # on the threads and not yet handed back (owner thread only)
        self._landing: deque[Job] = deque()  # host-to-device copies issued, oldest first (owner only)
        self._ready: deque[Job] = deque()  # back from a thread with nothing to copy (owner only)
        self._workers: dict[str, threading.Thread] = {}
        self.on_done: Callable[[], None] | None = None  # called on a worker after each read (wakes the owner)

    def submit(self, job: Job) -> None:
        if job.kind not in (HOST, DISK) and job.source is not None:
            self._issue(job, job.source)  # already in host memory: straight to the device
            return
        lane = STORE_LANE if job.kind == DISK else DEMAND_LANE if job.kind == DEMAND else BACKGROUND_LANE
        if lane not in self._workers:
            worker = threading.Thread(target=self._loop, args=(lane,), name=_THREAD_NAMES[lane], daemon=True)
            self._workers[lane] = worker
            worker.start()
        self._queued += 1
        self._jobs[lane].put((job.kind, job.seq, job))

    @property
    def landing(self) -> bool:
        """Whether a host-to-device copy is in flight."""
        return bool(self._landing)

    @property
    def reading(self) -> bool:
        """Whether a read from disk is queued or running."""
        return self._queued > 0

    def wait_landing(self) -> None:
        """Wait until the oldest copy in flight has landed (an idle loop, instead of sleeping)."""
        if self._landing:
            self._wait(self._landing[0])

    def finished(self, block: bool = False) -> Job | None:
        while True:
            self._take_reads()
            for job in self._landing:
                if job.error is not None or _landed(job.staged):
                    self._landing.remove(job)
                    return job
            if self._ready:
                return self._ready.popleft()
            if not block:
                return None
            if self._landing:
                job = self._landing.popleft()
                self._wait(job)
                return job
            if not self._queued:
                return None
            self._take_read(self._done.get())

    def close(self) -> None:
        for lane, worker in self._workers.items():
            self._jobs[lane].put((-1, -1, None))
            worker.join(timeout=30)
        self._landing.clear()

    def _take_reads(self) -> None:
        while True:
            try:
                job = self._done.get_nowait()
            except queue.Empty:
                return
            self._take_read(job)

    def _take_read(self, job: Job) -> None:
        """A job back from the thread: a device job's copy is issued now; the others are done."""
        self._queued -= 1
        if job.kind not in (HOST, DISK) and job.error is None:
            self._issue(job, job.read)
        else:
            self._ready.append(job)

    def _issue(self, job: Job, copy: HostCopy) -> None:
        begun = time.perf_counter()
        try:
            job.staged = self.issue(job, copy)
            job.bytes_device = sum(getattr(a, "nbytes", 0) for a in _leaves(job.staged))
        except Exception as e:
            log.warning("copying adapter %r to the device failed: %s", job.name, e)
            job.error = e
        job.busy_s += time.perf_counter() - begun
        self._landing.append(job)

    def _wait(self, job: Job) -> None:
        """Block until the job's copy has landed; its time counts as the job's."""
        begun = time.perf_counter()
        for leaf in _leaves(job.staged) if job.error is None else ():
            if hasattr(leaf, "block_until_ready"):
                try:
                    leaf.block_until_ready()
                except Exception as e:
                    job.error = e
                    break
        job.busy_s += time.perf_counter() - begun

    def _loop(self, lane: str) -> None:
        # Background work below the loop's priority: on a host with few cores, reading and laying
        # out an adapter would otherwise take CPU from the running steps (a prefetch only has to
        # finish before it is needed). A demand read has a request waiting: the loop's priority.
        if lane != DEMAND_LANE:
            with contextlib.suppress(AttributeError, OSError):  # not on this platform or not permitted
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            _, _, job = self._jobs[lane].get()
            if job is None:
                return
            begun = time.perf_counter()
            try:
                if job.kind == DISK:
                    self.fetch(job.entry)
                else:
                    job.read = self.read(job.entry, job.kind == DEMAND)
                    job.bytes_disk = job.entry.live_bytes
            except Exception as e:
                log.warning("loading adapter %r failed: %s", job.name, e)
                job.error = e
            job.busy_s = time.perf_counter() - begun
            self._done.put(job)
            if self.on_done is not None:
                self.on_done()


def _landed(staged) -> bool:
    """Whether every array of a staged copy is on the device (objects without the method are)."""
    return all(leaf.is_ready() for leaf in _leaves(staged) if hasattr(leaf, "is_ready"))


class VirtualClock:
    """Simulated time: read by calling it, moved forward by its owner (or a blocking wait)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


class _Channel:
    """One simulated link: jobs one at a time, the first queued in serving order first."""

    def __init__(self, stage: str):
        self.stage = stage  # what a job's time here is (`duration(job, stage)`)
        self.pending: dict[Job, float] = {}  # job -> when it was queued here
        self.running: tuple[Job, float] | None = None  # (job, when it finishes)
        self.free_at = 0.0  # when it finished its last job

    def start_next(self, duration: Callable[[Job, str], float]) -> None:
        if self.running is not None or not self.pending:
            return
        # The channel frees at free_at; of the jobs queued by then, the first in serving order
        # runs (if none was queued yet, the earliest to arrive).
        start = max(self.free_at, min(self.pending.values()))
        ready = [j for j, queued in self.pending.items() if queued <= start]
        job = min(ready, key=lambda j: (j.kind, j.seq))
        del self.pending[job]
        seconds = duration(job, self.stage)
        job.busy_s += seconds
        self.running = (job, start + seconds)


class SimulatedTransfer:
    def __init__(
        self,
        clock: VirtualClock,
        duration: Callable[[Job, str], float],
        failure: Callable[[Job], BaseException | None] | None = None,
    ):
        # `failure` (fault injection): the error a job ends with, or None for success.
        self.clock, self.duration, self.failure = clock, duration, failure
        # The store link; disk reads for demand loads; disk reads for the rest; host-to-device copies.
        self._store = _Channel(FETCH)
        self._demand, self._background, self._copy = _Channel(LOAD), _Channel(LOAD), _Channel(LOAD)
        self._channels = (self._store, self._demand, self._background, self._copy)
        self._done: deque[Job] = deque()
        self._after: dict[Job, list[Job]] = {}  # fetch in flight -> the jobs that read once it lands

    def submit(self, job: Job) -> None:
        self._run_until(self.clock())  # an idle channel starts the job now, as the live ones would
        if job.after is not None and job.after.ended is None:
            self._after.setdefault(job.after, []).append(job)
            return
        self._queue(job, self._store if job.fetch or job.kind == DISK else self._onwards(job), self.clock())

    def _onwards(self, job: Job) -> _Channel:
        """The channel a job takes from the node (after its fetch, if it needed one)."""
        if job.kind != HOST and job.source is not None:
            return self._copy
        return self._demand if job.kind == DEMAND else self._background

    def _queue(self, job: Job, channel: _Channel, when: float) -> None:
        channel.pending[job] = when
        channel.start_next(self.duration)

    def next_finish(self) -> float | None:
        """When the next stage of a job ends (None if none is queued): a job's end, or its fetch's."""
        self._run_until(self.clock())
        if self._done:
            return self.clock()
        ends = [c.running[1] for c in self._channels if c.running is not None]
        return min(ends) if ends else None

    def finished(self, block: bool = False) -> Job | None:
        self._run_until(self.clock())
        if not self._done and block:
            t = self.next_finish()
            if t is not None:
                self.clock.advance_to(t)
                self._run_until(t)
        return self._done.popleft() if self._done else None

    def close(self) -> None:
        pass

    def _run_until(self, now: float) -> None:
        """Finish, in time order across the channels, every stage that ends by `now`."""
        while True:
            for channel in self._channels:
                channel.start_next(self.duration)
            running = [c for c in self._channels if c.running is not None and c.running[1] <= now]
            if not running:
                return
            channel = min(running, key=lambda c: c.running[1])
            job, end = channel.running
            channel.free_at, channel.running = end, None
            if channel is self._store:
                job.bytes_remote = job.entry.live_bytes
                for waiting in self._after.pop(job, ()):  # they read what this fetch brought
                    self._queue(waiting, self._onwards(waiting), end)
                if job.kind != DISK:  # fetched: on to its read or copy
                    self._queue(job, self._onwards(job), end)
                    continue
            job.error = self.failure(job) if self.failure is not None else None
            if job.error is None and job.kind != DISK:
                if job.source is None:  # read from "disk": the copy is as big as its pages
                    job.read = HostCopy(None, None, job.entry.host_bytes)
                    job.bytes_disk = job.entry.live_bytes
                if job.kind != HOST:
                    job.bytes_device = job.entry.device_bytes
            job.ended = end
            self._done.append(job)


def _leaves(tree) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)
