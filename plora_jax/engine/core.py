"""EngineCore: the one owner of an engine's device state, and its loop.

All device state (the runner's `EngineState`), the scheduler, the adapter manager and the
residency policy belong to one thread: the loop thread once `start()` has run, or else
whoever calls `step()` (tests drive the engine that way, deterministically, without sleeping).
Other threads talk to it through the inbox (typed messages: `AddRequest`, `Cancel`, `Call`,
`Stop`) and read what it publishes: an immutable `EngineSnapshot` replaced after every
iteration and every call (`stats()`, `/metrics`, the server's 429 check and the input
processor's adapter check read it, never loop-owned objects).

One iteration (`step`):
1. drain the inbox (new requests, cancels, calls);
2. commit finished adapter transfers; ask the residency policy when its interval is due;
3. `scheduler.schedule()` -> a `StepPlan` (host only);
4. dispatch its decode and prefill steps through the runner (asynchronous);
5. read the *previous* iteration's tokens, which the device copied to host meanwhile: stop
   checks, detokenization and streaming overlap device work.

Adapters: the scheduler admits a request only with its adapter on the device (`AdapterGate`, run
by the simulator too). `record_steps` keeps each step's shape and duration (`step_log`).

The loop serves once the compile plan's minimal set is ready (warm-up; requests wait in the
inbox). An error in work that belongs to one request (its arrival, its tokens' stop checks and
text) fails that request alone and the loop goes on. A device or programming error ends the
loop: every open request fails (never a half-serving engine), each handle is told even if
publishing the last snapshot fails, `died` is set, and later calls raise `EngineDead`.

Liveness: `busy_since` is when the iteration or call in progress began (None when the loop is
idle or waiting for messages), written by the loop alone; a reader compares it with the clock
to tell a hung step from a quiet engine (`Engine.readiness`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jax
import numpy as np

from .. import compile_stats
from ..config import EngineConfig
from ..lora.manager import LoraManager
from ..lora.peft import AdapterError, AdapterRemoved
from ..lora.residency import RETIRED
from ..metrics import RESIDENCIES
from ..policies import Decision, Policy
from . import scoring
from .adapter_gate import AdapterGate
from .errors import EngineBusy, EngineDead  # noqa: F401 (EngineBusy: re-exported)
from .inputs import InputProcessor
from .kv_blocks import BlockAllocator
from .outputs import OutputProcessor, StreamEvent
from .runner import Launched, ModelRunner
from .scheduler import Request, Scheduler, Status
from .step_log import StepLog, shape_of

log = logging.getLogger(__name__)

_WAIT_S = 0.05  # longest an idle loop with work waits without a message (a safety net: transfers wake it)


# --- inbox messages ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request: Request


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Call:
    fn: Callable[[], Any]
    done: queue.SimpleQueue  # receives (ok, value or exception)


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Wake:
    """An adapter transfer finished: a loop waiting for it runs again at once."""


@dataclass(frozen=True)
class EngineSnapshot:
    """What the loop publishes after each iteration and call (immutable; read by any thread)."""

    stats: MappingProxyType  # the `Engine.stats()` dict
    adapters: frozenset[str] = frozenset()  # registered adapter names
    on_device: frozenset[str] = frozenset()  # adapters placed in the device pool (or loading into it)
    on_host: frozenset[str] = frozenset()  # adapters with a copy in the host cache
    waiting: int = 0  # requests waiting for admission (the server's 429 rule)


@dataclass
class _Counters:
    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_padded_tokens: int = 0
    policy_time_s: float = 0.0
    policy_fallbacks: int = 0
    ready_s: float = 0.0  # from construction to the minimal executables ready
    compiles_at_ready: int = 0


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        inputs: InputProcessor,
        lora: LoraManager | None,
        policy: Policy | None,
        blocks: BlockAllocator | None = None,
    ):
        self.config = config
        self.runner = runner
        self.inputs = inputs
        self.lora = lora
        self.outputs = OutputProcessor()
        self.gate = None  # admission to adapters (with LoRA)
        if lora is not None:
            self.gate = AdapterGate(
                lora,
                time.perf_counter,
                lambda: self.scheduler.waiting,
                self._wait_for,
                config.adapter_loads == "sync",
                lambda: len(self.scheduler.running),
                config.wait_host_copies,
            )
        self.scheduler = Scheduler.for_engine(config, runner.buckets.prefill[-1], self.gate, blocks=blocks)
        self.policy: Policy | None = None
        self._policy_warned = False
        self._next_decision = 0.0  # time.monotonic() of the next interval decision
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: list[tuple[Request, StreamEvent | BaseException]] = []  # delivered after publish()
        self._in_flight: list[Launched] | None = None
        self.step_log: StepLog | None = None  # set by `record_steps`
        self._in_flight_step = None  # (StepShape, start time) of the step in flight, when recorded
        self._woke: float | None = None  # when the loop handled its first message since the last iteration
        self._stall = 0.0  # seconds this iteration spent in synchronous loads
        self._thread: threading.Thread | None = None
        self._owner = threading.get_ident()  # the thread allowed to touch device state
        self._stopped = False
        self._post_lock = threading.Lock()
        self.fatal: BaseException | None = None
        self.died = threading.Event()  # set once the loop has died and told every request
        self.busy_since: float | None = None  # time.monotonic() the current iteration or call began
        self.scoring: set = set()  # open scoring sessions (scoring.Scoring): they pin adapters across calls
        self._counters = _Counters()
        itemsize = np.dtype(runner.dtype).itemsize  # a KV block's bytes: constant, published with the stats
        self._kv_block_bytes = runner.model_config.kv_block_bytes(config.block_size, itemsize)
        self._created = time.perf_counter()
        compile_stats.install()
        if lora is not None:
            lora.transfer.on_done = lambda: self._inbox.put(Wake())  # never blocks; a closed engine ignores it
        if lora is not None and policy is not None:
            self.adopt_policy(policy)
        self.snapshot = EngineSnapshot(MappingProxyType({}))
        self.publish()

    # --- threads ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Hand the engine to its own loop thread."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._thread = threading.Thread(target=self._run, name="plora-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; `timeout`: seconds to wait for it (a hung loop is then left behind)."""
        if self.running:
            self._inbox.put(Stop())
            self._thread.join(timeout)
        elif not self._stopped and self.fatal is None:
            self._drain_inbox(block=False)
            self._shutdown()

    @property
    def owner_thread(self) -> int:
        """The id of the thread that owns the device state (the loop, or the stepping caller)."""
        return self._owner

    def post(self, message) -> None:
        """Queue a message for the loop. Raises if the engine is closed or its loop died (the
        message is then never queued); a cancel of a closed engine is a no-op."""
        with self._post_lock:  # against _reject_inbox: nothing lands in an inbox nobody reads
            if isinstance(message, Cancel) and (self._stopped or self.fatal is not None):
                return
            self.check_alive()
            self._inbox.put(message)

    def call(self, fn: Callable[[], Any], timeout: float | None = None):
        """Run fn() on the owner of the device state (between steps) and return its result;
        `timeout`: seconds to wait for the loop (TimeoutError after; fn may still run later)."""
        self.check_alive()
        if not self.running:
            result = fn()
            self.publish()
            return result
        done: queue.SimpleQueue = queue.SimpleQueue()
        self.post(Call(fn, done))
        try:
            ok, value = done.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the engine loop did not answer within {timeout} s") from None
        if not ok:
            raise value
        return value

    def check_alive(self) -> None:
        if self.fatal is not None:
            raise EngineDead(f"the engine loop has stopped: {self.fatal}") from self.fatal
        if self._stopped:
            raise EngineDead("the engine is closed")

    def _run(self) -> None:
        self._owner = threading.get_ident()
        try:
            # Until the minimal executables exist, serve only the inbox: calls (adapter
            # registration, listings) answer at once, requests queue for the first step.
            while not self.runner.plan.minimal_ready.wait(0.05 if self._inbox.empty() else 0):
                if not self._drain_inbox(block=True, timeout=0.05):
                    self._shutdown()
                    return
            self._check_plan()
            self._mark_ready()
            progress = True
            while True:
                # Nothing in flight and nothing that could run (work waits for an adapter
                # transfer or the pool): wait for a copy to the device about to land, else block
                # until a message (a request, a call, a finished read's Wake) or the next policy
                # decision.
                idle = self._in_flight is None and (not progress or not self.scheduler.has_work())
                if idle and self._landing():
                    self.busy_since = time.monotonic()  # a transfer that never lands is a hung step
                    self.lora.transfer.wait_landing()  # a copy to the device about to land: commit it next
                    self.busy_since = None
                    idle = False
                if not self._drain_inbox(block=idle, timeout=_WAIT_S if self.scheduler.has_work() else None):
                    break
                progress = self._iterate()
            self._shutdown()
        except BaseException as e:  # a device or programming error: fail fast, never half-serve
            log.exception("engine loop failed")
            self._die(e)

    def _landing(self) -> bool:
        """Whether an adapter's copy to the device is in flight (issued by this loop)."""
        return self.lora is not None and self.lora.transfer.landing

    def _check_plan(self) -> None:
        failure = self.runner.plan.failure
        if failure is not None:
            raise RuntimeError(f"engine warm-up failed: {failure}") from failure

    def _mark_ready(self) -> None:
        if not self._counters.ready_s:
            self._woke = None  # messages handled while warming up are not a step's time
            self._counters.ready_s = time.perf_counter() - self._created
            self._counters.compiles_at_ready = compile_stats.compiles_on_thread()
            self.publish()

    def _die(self, error: BaseException) -> None:
        """Fail every open request with `error`, refuse new work, publish what can be. Each step
        is guarded: a failure here (an OOM that also killed the loop) never leaves a handle
        waiting forever."""
        try:
            open_requests = list(self.scheduler.running) + list(self.scheduler.waiting)
        except Exception:  # pragma: no cover - the scheduler's lists are plain containers
            open_requests = []
        for request in open_requests:
            self.inputs.release(request.request_id)
            self._outbox.append((request, error))
        try:
            self._reject_inbox(
                lambda: setattr(self, "fatal", error), EngineDead(f"the engine loop has stopped: {error}")
            )
        finally:
            try:
                self.publish()
            except Exception:
                log.exception("publishing the last snapshot failed; the requests were told")
            self.busy_since = None
            self.died.set()

    def _reject_inbox(self, close: Callable[[], None], error: BaseException) -> None:
        """Mark the engine closed or dead (`close`) and fail what is still queued: requests end
        with `error`, calls get it. Under the post lock, so nothing is queued after this."""
        with self._post_lock:
            close()
            while True:
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    return
                if isinstance(message, AddRequest):
                    self.inputs.release(message.request.request_id)
                    self._outbox.append((message.request, error))
                elif isinstance(message, Call):
                    message.done.put((False, error))

    def _shutdown(self) -> None:
        if self._in_flight is not None:
            self._process(self._in_flight)
            self._in_flight = None
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._end(request, "abort")
        self._reject_inbox(lambda: setattr(self, "_stopped", True), EngineDead("the engine is closed"))
        self.publish()

    # --- one iteration ----------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration on the calling thread (only while no loop thread runs); True while
        requests are queued, running or in flight."""
        if self.running:
            raise RuntimeError("the loop thread owns this engine; step() is for engines not started")
        self.check_alive()
        if not self.runner.plan.minimal_ready.is_set():
            self.runner.plan.minimal_ready.wait()
        self._check_plan()
        self._mark_ready()
        try:
            self._drain_inbox(block=False)
            if not self._iterate() and self.scheduler.has_work():
                if self._landing():
                    self.lora.transfer.wait_landing()
                else:
                    self._drain_inbox(block=True, timeout=0.001)  # waiting for a read: do not spin
        except BaseException as e:
            self._die(e)
            raise
        return self.has_work()

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work() or not self._inbox.empty()

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """step() until nothing is queued, running or in flight; returns the steps taken."""
        for n in itertools.count():
            if n >= max_steps:
                raise RuntimeError(f"still busy after {max_steps} steps")
            if not self.step():
                return n + 1
        raise AssertionError  # unreachable

    def _iterate(self) -> bool:
        """One iteration; False if it neither dispatched nor read anything."""
        self.busy_since = time.monotonic()
        try:
            return self._iterate_once()
        finally:
            self.busy_since = None

    def _iterate_once(self) -> bool:
        # A recorded step starts here, or at the first message this iteration handled (its host
        # work: arrivals and their policy decisions, polls, scheduling, inputs),
        # less any synchronous load inside the scheduling, which is the load's time, not the step's.
        begun, self._woke = self._woke or time.perf_counter(), None  # from the first message handled, if any
        stalled = self.gate.stall_s if self.gate is not None else 0.0
        committed = 0  # pages this iteration's poll commits (a synchronous load's are the load's time)
        # Prompts are chunked to the largest prefill size built: while warming up, and for good
        # if a background build failed (serving goes on with the sizes there are).
        ready = self.runner.plan.ready_sizes("prefill")
        largest = self.runner.buckets.prefill[-1]
        self.scheduler.max_num_batched_tokens = ready[-1] if ready and not self.runner.lazy else largest
        if self.lora is not None:
            committed = -self.lora.committed_pages
            self.poll_adapters()
            committed += self.lora.committed_pages
            if self.policy is not None and time.monotonic() >= self._next_decision:
                self._decide()
        plan = self.scheduler.schedule()
        if self.gate is not None and self.gate.unservable:
            self._fail_unservable()
        launched = None
        if plan is not None:
            launched = []
            if plan.decode:
                launched.append(self.runner.decode(plan.decode))
                self._counters.decode_steps += 1
            if plan.prefill:
                launched.append(self.runner.prefill(plan.prefill))
                self._counters.prefill_steps += 1
                self._counters.prefill_tokens += sum(len(row.token_ids) for row in plan.prefill)
            self._counters.steps += 1
        dispatched = None
        # A synchronous load ran before the previous step's tokens are read: not that step's time either.
        stall = self._stall = self.gate.stall_s - stalled if self.gate is not None else 0.0
        if launched is not None and self.step_log is not None:
            loading = self.lora is not None and bool(self.lora.loading or self.lora.host_jobs)
            buckets = self.runner.buckets
            dispatched = (shape_of(plan, buckets.decode, buckets.prefill, loading, committed), begun + stall)
        progress = launched is not None or self._in_flight is not None
        if self._in_flight is not None:
            self._process(self._in_flight)
        self._in_flight, self._in_flight_step = launched, dispatched
        self.publish()
        return progress

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> bool:
        """Handle every queued message (waiting for one if `block`, but not past the next policy
        decision or `timeout`); False on stop."""
        while True:
            if block and self.policy is not None:
                due = max(0.0, self._next_decision - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            try:
                message = self._inbox.get(block=block, timeout=timeout)
            except queue.Empty:
                return True
            block = False
            if self._woke is None:
                self._woke = time.perf_counter()
            if isinstance(message, Stop):
                return False
            if isinstance(message, Wake):
                continue
            if isinstance(message, AddRequest):
                self._per_request(message.request, lambda r=message.request: self._arrive(r))
            elif isinstance(message, Cancel):
                request = next(
                    (
                        r
                        for r in itertools.chain(self.scheduler.running, self.scheduler.waiting)
                        if r.request_id == message.request_id
                    ),
                    None,
                )
                if request is not None:
                    self._per_request(request, lambda r=request: self._end(r, "abort"))
            elif isinstance(message, Call):
                self.busy_since = time.monotonic()
                try:
                    result = (True, message.fn())
                except BaseException as e:
                    if not isinstance(e, Exception):  # the loop dies of it; the caller hears first
                        message.done.put((False, e))
                        raise
                    result = (False, e)
                finally:
                    self.busy_since = None
                try:
                    self.publish()  # before the reply: the caller's next read sees what the call did
                finally:
                    message.done.put(result)

    def _arrive(self, request: Request) -> None:
        self.scheduler.add(request)
        if self.policy is not None and request.adapter is not None:
            now = time.monotonic()
            self.policy.observe(request.adapter, now)
            self._decide(now)

    def _per_request(self, request: Request, work: Callable[[], None]) -> None:
        """Run `work` for one request. An exception there is that request's failure alone: it
        ends with the error, its blocks, slot and adapter pin are freed, and the loop goes on."""
        try:
            work()
        except Exception as e:
            log.exception("request %s failed on the engine loop; the loop goes on", request.request_id)
            s = self.scheduler
            if request.status is not Status.FINISHED and (request in s.waiting or request in s.running):
                s.finish(request, "abort")
            request.status = Status.FINISHED
            self.inputs.release(request.request_id)
            self._outbox.append((request, e))

    def record_steps(self, on: bool) -> None:
        """Start (or stop) recording every step's shape and duration (`step_log`)."""
        self.step_log = StepLog() if on else None

    # --- outputs ----------------------------------------------------------------------------
    def _process(self, launched: list[Launched]) -> None:
        read = [np.asarray(step.tokens) for step in launched]  # waits for the device
        if self._in_flight_step is not None and self.step_log is not None:
            self.step_log.read(*self._in_flight_step, time.perf_counter(), self._stall)
            self._in_flight_step = None
        self._stall = 0.0
        for step, tokens in zip(launched, read, strict=True):
            logprobs = None  # read from the device only when one of the step's rows asked
            for i, request in enumerate(step.requests):
                if request is None or request.status is Status.FINISHED:
                    continue  # a chunk that samples nothing, or a token past the end
                request.pending -= 1
                chosen, top = 0.0, None
                if request.params.logprobs:
                    if logprobs is None:
                        logprobs = jax.tree.map(np.asarray, step.logprobs)
                    chosen = float(logprobs.chosen[i])
                    k = request.params.top_logprobs
                    if k:
                        top = list(zip(logprobs.top_ids[i, :k].tolist(), logprobs.top[i, :k].tolist(), strict=True))
                self._per_request(request, lambda r=request, t=int(tokens[i]), c=chosen, k=top: self._token(r, t, c, k))

    def _token(self, request: Request, token: int, chosen: float, top) -> None:
        ended, event = self.outputs.append(request, token, chosen, top=top)
        if ended is not None:
            self._end(request, *ended)
        else:
            self._outbox.append((request, event))

    def _end(self, request: Request, reason: str, stop_reason=None) -> None:
        self.scheduler.finish(request, reason)
        self.inputs.release(request.request_id)
        self._outbox.append((request, self.outputs.finish(request, stop_reason)))

    def _fail_request(self, request: Request, error: BaseException) -> None:
        self.scheduler.finish(request, "abort")
        self.inputs.release(request.request_id)
        self._outbox.append((request, error))

    # --- the published snapshot -------------------------------------------------------------
    def publish(self) -> None:
        """Publish the snapshot, then deliver the events and failures gathered since the last
        (delivered even if the snapshot cannot be built)."""
        try:
            self._publish_snapshot()
        finally:
            self._deliver()

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, []
        for request, item in outbox:
            handle = request.handle
            if handle is None:
                continue
            try:
                if isinstance(item, BaseException):
                    handle._fail(item)
                else:
                    handle._push(item)
            except Exception as e:  # one handle's failure never keeps the others from hearing
                log.exception("delivering to request %s failed", request.request_id)
                with contextlib.suppress(Exception):
                    handle._fail(e)

    def _publish_snapshot(self) -> None:
        s, c = self.scheduler, self._counters
        loop_compiles = compile_stats.compiles_on_thread(self._owner)
        stats = {
            "loop_compiles": loop_compiles,
            "compiles_after_warmup": loop_compiles - c.compiles_at_ready if c.ready_s else 0,
            "warmup_s": c.ready_s,
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_blocks_used": s.blocks.num_used,
            "kv_blocks_total": s.blocks.num_blocks - 1,
            "kv_block_bytes": self._kv_block_bytes,
            "num_preemptions": s.num_preemptions,
            "steps": c.steps,
            "decode_steps": c.decode_steps,
            "prefill_steps": c.prefill_steps,
            "prefill_tokens": c.prefill_tokens,
            "attention_implementation": self.runner.attention_implementation,
            "lora_implementation": self.runner.lora_implementation,
        }
        adapters = on_device = on_host = frozenset()
        if self.lora is not None:
            stats.update(self.lora.stats(), stall_s=self.gate.stall_row_s, sync_load_s=self.gate.stall_s)
            tiers = dict.fromkeys(RESIDENCIES, 0)
            for name in self.lora.entries:
                tiers[self.lora.residency(name)] += 1
            stats.update({f"adapters_tier_{tier}": count for tier, count in tiers.items()})
            adapters = frozenset(self.lora.entries)
            on_device = frozenset(n for n in self.lora.pages.resident if RETIRED not in n)
            on_host = frozenset(self.lora.host.copies)
        if self.policy is not None:
            stats.update(
                policy=self.policy.name,
                policy_time_s=c.policy_time_s,
                policy_fallbacks=c.policy_fallbacks,
                **self.policy.stats(),
            )
        self.snapshot = EngineSnapshot(MappingProxyType(stats), adapters, on_device, on_host, len(s.waiting))

    # --- adapters (residency changes run on the owner thread) -------------------------------
    def _set_pool(self, pool) -> None:
        self.runner.state = dataclasses.replace(self.runner.state, lora=pool)

    def _fail_unservable(self) -> None:
        for request in self.gate.unservable:
            if request.status is not Status.FINISHED:
                name = request.adapter.split(RETIRED)[0]
                self._fail_request(request, AdapterRemoved(f"adapter {name!r} was removed"))
        self.gate.unservable.clear()

    def _wait_for(self, name: str) -> list[tuple[str, BaseException]]:
        """A synchronous load (the gate's `wait_for`): block until `name`'s copy is committed."""
        pool, failures = self.lora.wait_for(name, self.runner.state.lora)
        self._set_pool(pool)
        return failures

    def poll_adapters(self, wait_for: str | None = None) -> list[tuple[str, BaseException]]:
        """Commit finished adapter transfers (optionally waiting for `wait_for`'s); fail the
        requests whose adapter could not be loaded."""
        if wait_for is not None:
            pool, failures = self.lora.wait_for(wait_for, self.runner.state.lora)
        else:
            pool, failures = self.lora.poll(self.runner.state.lora)
        self._set_pool(pool)
        failures = self.gate.take_failures(failures)
        for name, error in failures:
            for request in list(self.scheduler.waiting):
                if request.adapter == name:
                    self._fail_request(request, AdapterError(f"adapter {name!r} could not be loaded: {error}"))
        return failures

    def wait_for_adapter(self, name: str) -> None:
        """Block until `name`'s device load in flight (if any) is committed or has failed."""
        self.poll_adapters(wait_for=name)
        self.publish()

    def remove_adapter(self, name: str) -> None:
        if name not in self.lora.entries:
            raise ValueError(f"adapter {name!r} is not registered")
        for request in list(self.scheduler.waiting):
            if request.adapter == name:
                self._fail_request(request, AdapterRemoved(f"adapter {name!r} was removed"))
        retired = self.lora.remove(name)
        if self.policy is not None:
            self.policy.forget(name)
        if retired is not None:  # running requests and open scoring finish on the old version's pages
            probes = [probe for session in self.scoring for probe in session.probes]
            for request in [*self.scheduler.running, *probes]:
                if request.adapter == name:
                    request.adapter = retired

    def reset_adapters(self, adapter_loads: str | None, reset_node_cache: bool = False) -> None:
        if self.scheduler.has_work() or self.scoring:
            raise RuntimeError("reset_adapters needs an idle engine (requests are running or waiting, or scoring)")
        self._set_pool(self.lora.clear(self.runner.state.lora))
        if reset_node_cache:
            self.lora.node_cache.clear()
            self.lora.disk.clear()
        if adapter_loads is not None:
            self.config = dataclasses.replace(self.config, adapter_loads=adapter_loads)
            self._set_sync()

    def _set_sync(self) -> None:
        """Loads are synchronous when the config says so or the policy is S-LoRA's."""
        self.gate.sync = self.config.adapter_loads == "sync" or (self.policy is not None and self.policy.sync_loads)

    # --- residency policy -------------------------------------------------------------------
    def adopt_policy(self, policy: Policy) -> None:
        if self.policy is not None:
            self.policy.close()
        self.policy = policy
        self.lora.free_when_unused = policy.free_when_unused
        self._set_sync()
        self._policy_warned = False
        self._next_decision = 0.0
        policy.start()

    def _decide(self, now: float | None = None) -> None:
        """Ask the policy (at an arrival or an interval) and apply its decision. A policy that
        raises (a failed or stalled forecaster) falls back to reactive loading until it answers
        again: no prefetch, and an adapter is freed when its last request ends (logged once per
        outage)."""
        now = time.monotonic() if now is None else now
        start = time.perf_counter()
        queued = tuple(r.adapter for r in self.scheduler.waiting if r.adapter is not None)
        view = self.lora.view(now, queued)
        try:
            decision = self.policy.decide(view)
        except Exception as e:
            self._counters.policy_fallbacks += 1
            if not self._policy_warned:
                self._policy_warned = True
                log.warning("policy %r failed (%s); falling back to reactive loading", self.policy.name, e)
            decision = Decision()
            self.lora.free_when_unused = True
        else:
            if self._policy_warned:
                self._policy_warned = False
                log.warning("policy %r answers again; reactive fallback ended", self.policy.name)
            self.lora.free_when_unused = self.policy.free_when_unused
        self.lora.apply(decision)
        self._counters.policy_time_s += time.perf_counter() - start
        self._next_decision = now + self.policy.interval_s

    # --- scoring ----------------------------------------------------------------------------
    def score(self, seqs: list[list[int]], adapters: list[str | None]) -> list[np.ndarray]:
        """Logits of every position of each sequence (owner thread; `scoring.score`)."""
        return scoring.score(self, seqs, adapters)
