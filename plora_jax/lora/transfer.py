"""Moving adapters between tiers: the transfer thread of a live engine, and its simulated twin.

A `Job` is one transfer. The residency core (`residency.py`) places it (device jobs get their
pages and slot first), hands it to a `Transfer`, and takes it back from `finished` at a step
boundary. Everything a transfer produces travels in the job (`read`, `staged`, `error`,
`bytes_disk`): the transfer never writes into the registry, the host cache or the page pool,
so the owner of those (the engine loop) is their only writer.

Kinds, in the order a transfer serves them: `DEMAND` (a request waits for it), `PREFETCH` (a
policy's device prefetch), `HOST` (a policy's read into the host cache only).

- `ThreadTransfer` runs jobs on one thread, below the loop's OS priority: it reads the folder
  if the job has no host copy, then, for device jobs, stages the commit's arguments on the
  device (`stage`, given by the owner).
- `SimulatedTransfer` runs them on a virtual clock: one channel, jobs one at a time in the same
  order, each lasting `duration(job)` seconds (from a cost profile). `finished(block=True)`
  advances the clock to the next completion, as a blocking wait would take that long.
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

DEMAND, PREFETCH, HOST = 0, 1, 2  # job kinds, in the order transfers serve them


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
    # Results, written by the transfer before it hands the job back:
    read: HostCopy | None = None  # the copy read from the folder for this job
    staged: tuple | None = field(default=None, repr=False)  # the commit's arguments, on the device
    error: BaseException | None = None
    bytes_disk: int = 0
    bytes_device: int = 0  # bytes copied to the device for it
    busy_s: float = 0.0  # seconds the transfer spent on it (not counting its wait in the queue)


class Transfer(Protocol):
    def submit(self, job: Job) -> None:
        """Queue `job` (owner thread)."""

    def finished(self, block: bool = False) -> Job | None:
        """A finished job (owner thread), or None; with `block`, wait for one if any is queued."""

    def close(self) -> None: ...


class ThreadTransfer:
    def __init__(self, read: Callable[[AdapterEntry], HostCopy], stage: Callable[[Job, HostCopy], tuple]):
        self.read, self.stage = read, stage
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # submitted and not yet handed back (owner thread only)
        self._worker: threading.Thread | None = None
        self.on_done: Callable[[], None] | None = None  # called on the worker after each job (wakes the owner)

    def submit(self, job: Job) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name="plora-adapter-transfer", daemon=True)
            self._worker.start()
        self._queued += 1
        self._jobs.put((job.kind, job.seq, job))

    def finished(self, block: bool = False) -> Job | None:
        try:
            job = self._done.get(block=block and self._queued > 0)
        except queue.Empty:
            return None
        self._queued -= 1
        return job

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put((-1, -1, None))
            self._worker.join(timeout=30)

    def _loop(self) -> None:
        # Below the loop's priority: on a host with few cores, reading and laying out an adapter
        # would otherwise take CPU from the running steps (it only has to finish before it is needed).
        with contextlib.suppress(AttributeError, OSError):  # not on this platform or not permitted
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            begun = time.perf_counter()
            try:
                copy = job.source
                if copy is None:
                    copy = job.read = self.read(job.entry)
                    job.bytes_disk = job.entry.live_bytes
                if job.kind != HOST:
                    job.staged = self.stage(job, copy)
                    job.bytes_device = sum(getattr(a, "nbytes", 0) for a in _leaves(job.staged))
            except Exception as e:
                log.warning("loading adapter %r failed: %s", job.name, e)
                job.error = e
            job.busy_s = time.perf_counter() - begun
            self._done.put(job)
            if self.on_done is not None:
                self.on_done()


class VirtualClock:
    """Simulated time: read by calling it, moved forward by its owner (or a blocking wait)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


class SimulatedTransfer:
    def __init__(
        self,
        clock: VirtualClock,
        duration: Callable[[Job], float],
        failure: Callable[[Job], BaseException | None] | None = None,
    ):
        # `failure` (fault injection): the error a job ends with, or None for success.
        self.clock, self.duration, self.failure = clock, duration, failure
        self._pending: list[Job] = []
        self._running: tuple[Job, float] | None = None  # (job, when it finishes)
        self._free_at = 0.0  # when the channel finished its last job
        self._done: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self._run_until(self.clock())  # an idle channel starts the job now, as a thread would
        self._pending.append(job)
        self._start_next()

    def next_finish(self) -> float | None:
        """When the next job finishes (None if none is queued)."""
        self._run_until(self.clock())
        if self._done:
            return self.clock()
        self._start_next()
        return self._running[1] if self._running else None

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

    def _start_next(self) -> None:
        if self._running is not None or not self._pending:
            return
        # The channel frees at _free_at; of the jobs queued by then, the first in serving order
        # runs (if none was queued yet, the earliest to arrive).
        start = max(self._free_at, min(j.started for j in self._pending))
        ready = [j for j in self._pending if j.started <= start]
        job = min(ready, key=lambda j: (j.kind, j.seq))
        self._pending.remove(job)
        job.busy_s = self.duration(job)
        self._running = (job, start + job.busy_s)

    def _run_until(self, now: float) -> None:
        while True:
            self._start_next()
            if self._running is None or self._running[1] > now:
                return
            job, end = self._running
            job.error = self.failure(job) if self.failure is not None else None
            if job.error is None:
                if job.source is None:  # read from "disk": the copy is as big as its pages
                    job.read = HostCopy(None, None, job.entry.host_bytes)
                    job.bytes_disk = job.entry.live_bytes
                if job.kind != HOST:
                    job.bytes_device = job.entry.device_bytes
            self._done.append(job)
            self._free_at, self._running = end, None


def _leaves(tree) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)
