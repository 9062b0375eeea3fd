"""What a request gives back: stream events while it runs, a `RequestOutput` when it ends, and
the loop-thread side that produces them (`OutputProcessor`).

`OutputProcessor` turns each sampled token into a stop check (stop token, stop string, length),
text (through the request's own incremental detokenizer, which travels with the request) and
a `StreamEvent` for the request's handle; the last event carries the `RequestOutput`. The core
delivers the events after it has published the iteration's snapshot, so a caller woken by its
request's end already sees that end in `stats()`.

`RequestHandle` is the caller's side of one request. The engine's loop thread appends events to
one list; every consumer keeps its own cursor into it, so a consumer that starts late replays
what it missed. Blocking consumers (`for event in handle`, `handle.result()`) wait on a
condition variable; asyncio consumers (`async for event in handle.events()`,
`await handle.aresult()`) are woken through `loop.call_soon_threadsafe`, so no executor thread
is parked per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scheduler import Request


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
    adapter_tier: str = ""  # the fastest tier holding its adapter then (`plora_jax.metrics.TIERS`)
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
    # per generated token, its `top_logprobs` likeliest (token id, log-probability), if asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    metrics: RequestMetrics | None = None
    prompt: str | None = None


@dataclass
class StreamEvent:
    text: str  # text added since the previous event
    token_ids: list[int]  # token ids added since the previous event
    finished: bool = False
    output: RequestOutput | None = None  # set on the last event
    logprobs: list[float] | None = None  # of `token_ids`, if the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token of `token_ids`, if asked


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
            with contextlib.suppress(RuntimeError):  # the consumer's event loop has closed: nobody waits
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


class OutputProcessor:
    """Sampled tokens -> stop checks, text and events. Loop thread only; the events are
    returned for the core to deliver."""

    @staticmethod
    def append(request: Request, token: int, logprob: float, now: float | None = None, top=None):
        """Record one sampled token (read at `now`, default the wall clock; a simulator passes
        its own), its log-probability and `top` [(token id, log-probability)]. Returns
        ((finish_reason, stop_reason), None) if it ends the request, else (None, the
        StreamEvent carrying its text)."""
        request.output_ids.append(token)
        request.logprobs.append(logprob)
        if top is not None:
            request.top_logprobs.append(top)
        if request.first_token is None:
            request.first_token = time.perf_counter() if now is None else now
        detok = request.detokenizer
        if detok is not None:
            detok.add_token(token)
        if token in request.stop_ids:
            return ("stop", token), None
        if detok is not None and detok.stop_string is not None:
            return ("stop", detok.stop_string), None
        if (
            len(request.output_ids) >= request.params.max_tokens
            or len(request.prompt_ids) + len(request.output_ids) >= request.max_total
        ):
            return ("length", None), None
        wanted = request.params.logprobs
        text = detok.take_delta(False) if detok else ""
        return None, StreamEvent(text, [token], logprobs=[logprob] if wanted else None, top_logprobs=top and [top])

    @staticmethod
    def finish(request: Request, stop_reason=None) -> StreamEvent:
        """The last event of a request the scheduler has finished."""
        detok = request.detokenizer
        last = [request.output_ids[-1]] if request.output_ids and request.finish_reason != "abort" else []
        delta = detok.take_delta(True) if detok else ""
        event = StreamEvent(delta, last, True, OutputProcessor.output(request, stop_reason))
        if request.params.logprobs:
            event.logprobs = request.logprobs[-len(last) :] if last else []
            event.top_logprobs = request.top_logprobs[-len(last) :] if last and request.top_logprobs else None
        return event

    @staticmethod
    def output(request: Request, stop_reason=None) -> RequestOutput:
        end = request.finished_at
        first = request.first_token or end
        n = len(request.output_ids)
        metrics = RequestMetrics(
            arrival_time=request.arrival,
            queue_s=(request.first_scheduled or end) - request.arrival,
            ttft_s=first - request.arrival,
            tpot_s=(end - first) / (n - 1) if n > 1 else 0.0,
            e2e_s=end - request.arrival,
            num_preemptions=request.num_preemptions,
            adapter_wait_s=request.adapter_wait,
            cold_start=request.adapter_cold,
            adapter_tier=request.adapter_tier,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_ids,
            token_ids=list(request.output_ids),
            text=request.detokenizer.text if request.detokenizer else "",
            finish_reason=request.finish_reason,
            stop_reason=stop_reason,
            logprobs=list(request.logprobs) if request.params.logprobs else None,
            top_logprobs=list(request.top_logprobs) if request.params.top_logprobs else None,
            metrics=metrics,
            prompt=request.prompt_text,
        )
