"""`predictive`: P-LoRA. A forecaster scores every adapter's demand for the next interval; the
adapters with the highest scores that fit the device pool are prefetched, and eviction takes
the lowest forecast demand per byte first.

The forecaster runs on its own thread, once per interval: it bins the arrivals `observe` saw
into one count per adapter, feeds them to the forecaster and stores the new scores with the time
they took. `decide` (on the engine loop, at every arrival and interval) only reads the latest
scores, so the loop never waits on a forecast. If the forecaster raised at its last run, or has
not produced scores for `stall_intervals` intervals (and at least `min_stall_s`), `decide`
raises `PredictorUnavailable` and the engine falls back to reactive loading (and logs it once)
until scores flow again.

Any object with `update(counts)` and `predict()` is a forecaster (`Forecaster` below). The LSTM
of `plora_jax.predictor` is what the engine uses (`make_forecaster`); `EwmaForecaster` (an exponentially
weighted rate turned into the probability of at least one request) is the dependency-free one.

Decisions, at each call:
1. adapters of queued requests come first (their demand is certain), then the rest by score,
   with resident adapters' scores raised by `hysteresis` so that near-equal scores do not swap
   adapters in and out every interval; adapters scoring under `min_score` are never prefetched;
2. the greedy prefix that fits the device pool (bytes and slots) is the wanted set; what it holds
   that is not resident is prefetched, most wanted first; the next ones that fit the host budget
   are read into the host cache, and the next that fit the node cache fetched from their store
   (`base.fill_tiers`);
3. eviction priority: wanted adapters 1 + value per byte (normalised), the rest value per byte
   alone, so a prefetch only ever displaces an adapter outside the wanted set. An adapter's
   value is its forecast, or, with `retention_intervals` > 0, the chance of a request next
   interval that its own gaps imply if they expect it back sooner (`retention.GapHazard`), so
   that an adapter returning on a schedule longer than one interval is not evicted for one
   whose burst has ended. Off by default: measured, it does not pay (`retention`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

from .base import Decision, Policy, PoolView, fill_tiers
from .retention import RETENTION_INTERVALS, GapHazard

log = logging.getLogger(__name__)


class Forecaster(Protocol):
    def update(self, counts: Mapping[str, int]) -> None:
        """One interval's request counts (adapters absent from `counts` had none)."""

    def predict(self) -> dict[str, float]:
        """Per adapter seen so far, the probability of at least one request in the next interval."""

    def warm(self) -> None:
        """Compile what `update` will run (optional: called once on the predictor thread at start,
        so the first interval under traffic does not compile)."""

    def forget(self, names: Collection[str]) -> None:
        """Drop the state of these adapters (unregistered, or idle for long)."""


class EwmaForecaster:
    """Per adapter an exponentially weighted request rate r; P(>= 1 request) = 1 - exp(-r)."""

    def __init__(self, alpha: float = 0.3):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.rates: dict[str, float] = {}

    def update(self, counts: Mapping[str, int]) -> None:
        for name in self.rates.keys() - counts.keys():
            self.rates[name] *= 1.0 - self.alpha
        for name, count in counts.items():
            self.rates[name] = self.alpha * count + (1.0 - self.alpha) * self.rates.get(name, 0.0)

    def predict(self) -> dict[str, float]:
        return {name: 1.0 - math.exp(-rate) for name, rate in self.rates.items()}

    def forget(self, names: Collection[str]) -> None:
        for name in names:
            self.rates.pop(name, None)


def make_forecaster(checkpoint: str = "", interval_s: float = 60.0) -> Forecaster:
    """The LSTM of `plora_jax.predictor` ("": the checkpoint shipped with it, or a checkpoint
    folder), or "ewma" for `EwmaForecaster`."""
    if checkpoint == "ewma":
        return EwmaForecaster()
    from plora_jax.predictor.forecaster import LstmForecaster  # flax and orbax: only when used

    return LstmForecaster(checkpoint or None, interval_minutes=interval_s / 60.0)


class PredictorUnavailable(RuntimeError):
    """The forecaster failed or stalled; the engine falls back to reactive loading."""


class Predictive(Policy):
    name = "predictive"

    def __init__(
        self,
        forecaster: Forecaster | None = None,
        interval_s: float = 60.0,
        hysteresis: float = 0.25,
        min_score: float = 0.05,
        stall_intervals: float = 3.0,
        min_stall_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        retention_intervals: float = RETENTION_INTERVALS,
    ):
        self.forecaster = forecaster if forecaster is not None else EwmaForecaster()
        super().__init__(interval_s)
        # Eviction looks this far ahead for adapters that return (0: the forecast alone); the
        # loop thread alone reads and writes it, as it observes arrivals and decides.
        self.retention = GapHazard(retention_intervals * interval_s, interval_s) if retention_intervals > 0 else None
        self.hysteresis, self.min_score = hysteresis, min_score
        # A forecast later than this is a stall (never sooner than min_stall_s: the first run compiles).
        self.stall_s = max(stall_intervals * interval_s, min_stall_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: Counter = Counter()  # arrivals of the interval in progress
        self._scores: dict[str, float] = {}
        self._scored_at: float | None = None  # when the last successful forecast finished
        self._error: BaseException | None = None  # the last forecast's failure, until one succeeds
        self._forgotten: set[str] = set()  # unregistered since the last interval (the thread drops them)
        # Forecast latencies as running aggregates: the engine reads them after every step, so
        # their cost must not grow with uptime.
        self._runs, self._latency_sum, self._latency_max = 0, 0.0, 0.0
        self._failures = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()  # the forecaster is warm (set on the predictor thread)
        self._started_at = clock()

    # --- the forecaster side (its own thread, or a simulator calling `step`) ---------------------
    def observe(self, adapter: str | None, now: float) -> None:
        if adapter is not None:
            with self._lock:
                self._pending[adapter] += 1
            if self.retention is not None:
                self.retention.observe(adapter, now)

    def forget(self, adapter: str) -> None:
        if self.retention is not None:
            self.retention.forget(adapter)
        with self._lock:
            self._forgotten.add(adapter)
            self._pending.pop(adapter, None)
            self._scores = {n: s for n, s in self._scores.items() if n != adapter}

    def step(self) -> None:
        """Close the current interval: feed its counts to the forecaster and store new scores."""
        with self._lock:
            counts, self._pending = self._pending, Counter()
            forgotten, self._forgotten = self._forgotten, set()
        start = time.perf_counter()
        try:
            if forgotten:
                self.forecaster.forget(forgotten)
            self.forecaster.update(counts)
            scores = self.forecaster.predict()
        except Exception as e:
            with self._lock:
                self._error = e
                self._failures += 1
            raise
        latency = time.perf_counter() - start
        with self._lock:
            gone = self._forgotten  # unregistered while this forecast ran
            self._scores = {n: s for n, s in scores.items() if n not in gone}
            self._scored_at, self._error = self.clock(), None
            self._runs += 1
            self._latency_sum += latency
            self._latency_max = max(self._latency_max, latency)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._started_at = self.clock()
        self._thread = threading.Thread(target=self._run, name="plora-predictor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        warm = getattr(self.forecaster, "warm", None)
        try:
            if warm is not None:
                warm()
        except Exception:
            log.debug("forecaster warm-up failed", exc_info=True)  # its first interval will fail and report
        finally:
            self._ready.set()
        next_run = self.clock() + self.interval_s
        while not self._stop.wait(max(0.0, next_run - self.clock())):
            next_run += self.interval_s
            try:
                self.step()
            except Exception:
                log.debug("forecaster failed", exc_info=True)  # the engine reports it once

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._thread is None or self._ready.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the decision side (engine loop) ---------------------------------------------------------
    def scores(self, now: float) -> dict[str, float]:
        with self._lock:
            error, scored_at, scores = self._error, self._scored_at, self._scores
        if error is not None:
            raise PredictorUnavailable(f"the forecaster raised {type(error).__name__}: {error}") from error
        last = scored_at if scored_at is not None else self._started_at
        if self._thread is not None and now - last > self.stall_s:
            raise PredictorUnavailable(f"no forecast for {now - last:.1f} s (interval {self.interval_s} s)")
        return scores

    def expected_demand(self, now: float, horizon_s: float) -> float:
        """The forecast probabilities of a request next interval, summed (0 while unavailable)."""
        try:
            return float(sum(self.scores(now).values()))
        except PredictorUnavailable:
            return 0.0

    def decide(self, view: PoolView) -> Decision:
        scores = self.scores(view.now)
        sizes = view.adapter_bytes

        def key(name: str) -> float:
            score = scores.get(name, 0.0)
            return score * (1.0 + self.hysteresis) if name in view.on_device else score

        queued = [n for n in dict.fromkeys(view.queued) if n in sizes]
        queued_set = set(queued)
        forecast = sorted(
            (n for n, s in scores.items() if s >= self.min_score and n in sizes and n not in queued_set),
            key=key,
            reverse=True,
        )
        wanted, host, disk = fill_tiers(queued + forecast, view)
        # Eviction: the sooner of the forecast's next arrival and retention's (its own gaps).
        returns = self.retention.waits(view.now) if self.retention is not None else {}
        named = dict.fromkeys([*scores, *returns])  # in a fixed order: a set's would vary between runs
        soonest = {n: self._soonest(scores.get(n, 0.0), returns.get(n)) for n in named if n in sizes}
        per_byte = {n: v / max(1, sizes[n]) for n, v in soonest.items()}
        top = max(per_byte.values(), default=0.0) or 1.0
        priority = {n: v / top for n, v in per_byte.items()}
        for n in wanted:
            priority[n] = 1.0 + priority.get(n, 0.0)
        return Decision(device=[n for n in wanted if n not in view.on_device], host=host, disk=disk, priority=priority)

    def _soonest(self, score: float, wait_s: float | None) -> float:
        """An adapter's value for eviction, as a chance of a request next interval: its forecast
        `score`, or, if its own gaps expect it back sooner (`wait_s`, retention's), the chance
        that a Poisson stream with that mean wait brings one."""
        if wait_s is None:
            return score
        return max(score, 1.0 - math.exp(-self.interval_s / max(wait_s, 1e-9)))

    def stats(self) -> dict:
        with self._lock:
            runs, total, peak, failures = self._runs, self._latency_sum, self._latency_max, self._failures
        return {
            "predictor_runs": runs,
            "predictor_failures": failures,
            "predictor_latency_mean_s": total / runs if runs else 0.0,
            "predictor_latency_max_s": peak,
        }
