"""What a request gives back: stream events while it runs, a `RequestOutput` when it ends.

`RequestHandle` is the caller's side of one request. The engine's loop thread appends events to
one list; every consumer keeps its own cursor into it, so a consumer that starts late replays
what it missed. Blocking consumers (`for event in handle`, `handle.result()`) wait on a
condition variable; asyncio consumers (`async for event in handle.events()`,
`await handle.aresult()`) are woken through `loop.call_soon_threadsafe`, so no executor thread
is parked per stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass


@dataclass
class RequestMetrics:
    """Seconds, measured on the engine's clock (time.perf_counter)."""

    arrival_time: float
    queue_s: float  # arrival -> first scheduled
    ttft_s: float  # arrival -> first token seen by the host
    tpot_s: float  # mean time per output token after the first
    e2e_s: float  # arrival -> finished
    adapter_wait_s: float = 0.0  # time spent waiting for the request's adapter to load
    cold_start: bool = False  # its adapter was not on the device when it first asked for it
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The result of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, including a final EOS / stop token id
    text: str  # generated text (special tokens removed, cut at a stop string)
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[float] | None = None  # log-probability of each generated token, if asked
    metrics: RequestMetrics | None = None
    prompt: str | None = None


@dataclass
class StreamEvent:
    text: str  # text added since the previous event
    token_ids: list[int]  # token ids added since the previous event
    finished: bool = False
    output: RequestOutput | None = None  # set on the last event


class RequestFailed(RuntimeError):
    """The engine stopped before the request finished (the cause is chained)."""


class RequestHandle:
    def __init__(self, request_id: str, cancel: Callable[[str], None]):
        self.request_id = request_id
        self._cancel = cancel
        self._events: list[StreamEvent] = []
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._done = False

    # --- engine side (loop thread) ------------------------------------------------------
    def _push(self, event: StreamEvent) -> None:
        with self._cond:
            self._events.append(event)
            if event.finished:
                self._output = event.output
                self._done = True
            self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._done:
                return
            self._error = error
            self._done = True
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, event in self._async_waiters:
            loop.call_soon_threadsafe(event.set)
        self._async_waiters.clear()

    # --- caller side --------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Abort the request; it ends with finish_reason "abort" and frees its resources."""
        if not self._done:
            self._cancel(self.request_id)

    def _check(self) -> None:
        if self._error is not None:
            raise RequestFailed(f"request {self.request_id} failed: {self._error}") from self._error

    def __iter__(self) -> Iterator[StreamEvent]:
        cursor = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda seen=cursor: seen < len(self._events) or self._done)
                new, done = self._events[cursor:], self._done
            cursor += len(new)
            yield from new
            if done and cursor == len(self._events):
                self._check()
                return

    def result(self, timeout: float | None = None) -> RequestOutput:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout}s")
        self._check()
        return self._output

    async def events(self) -> AsyncIterator[StreamEvent]:
        cursor = 0
        while True:
            with self._cond:
                new, done = self._events[cursor:], self._done
                if not new and not done:
                    wake = asyncio.Event()
                    self._async_waiters.append((asyncio.get_running_loop(), wake))
            if new:
                cursor += len(new)
                for event in new:
                    yield event
                continue
            if done:
                self._check()
                return
            await wake.wait()

    async def aresult(self) -> RequestOutput:
        async for _ in self.events():
            pass
        return self._output
