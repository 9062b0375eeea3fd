"""The forecaster of the cluster, and the autoscaling policy that reads it.

`Forecaster` is one small CPU replica. The gateway reports each second's arrivals per adapter
(`observe`); replicas report their residency (`report`, from their routing stats; a report
older than `report_ttl_s` is from a replica that died or scaled away, and is dropped). Every
`interval_s` the forecaster's thread, the one owner of its state, runs the shipped LSTM
(`plora_jax.policies.predictive.make_forecaster`: P(at least one request next interval) per
adapter) and acts:
- pre-loads the likeliest adapters (`placement.prefetch_plan`) through the LoraEngine handle,
  each call tagged with its adapter id so the router places it (a no-op at a replica already
  holding it; on a second replica when the adapter is hot), which also starts a replica from
  zero when demand is forecast (the pre-warm); nothing is pre-loaded when the forecast needs
  no replica, so pre-loads never keep a deployment from scaling to zero;
- publishes the replicas the forecast needs (`placement.replicas_needed`) to a small named
  actor, `ForecastBoard`, which the autoscaling policy polls without blocking;
- publishes the hot adapters, returned to the gateway with each `observe` for its router.
`step()` runs one interval at once, through the same thread, and waits for its pre-loads: tests
and benchmarks drive the forecaster with it instead of waiting for a timer.

`ForecastAutoscaler` is the LoraEngine deployment's autoscaling policy: the larger of Serve's
own queue-length target (its state and delays kept) and the forecast's replica count, so
replicas start before the traffic and scale to zero only when no demand is forecast.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter

import ray
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

from plora_jax.serverless.placement import hot_adapters, prefetch_keep, prefetch_plan, replicas_needed

log = logging.getLogger(__name__)

BOARD_NAMESPACE = "plora"


def board_name(app_name: str) -> str:
    return f"plora-forecast-{app_name}"


IDLE_RATE = 1e-4  # requests per interval below which an adapter's state is dropped


@ray.remote(num_cpus=0)
class ForecastBoard:
    """The forecaster's latest figures (it is the one writer; the autoscaler reads)."""

    def __init__(self):
        self.value = {"replicas": 0, "published_at": 0.0}

    def put(self, value: dict) -> None:
        self.value = value

    def get(self) -> dict:
        return self.value


class ForecastAutoscaler:
    """max(Serve's queue-length policy, the forecast's replicas); a class-based Serve policy."""

    def __init__(self, board: str, stale_s: float = 300.0):
        self.board, self.stale_s = board, stale_s
        self._actor = None
        self._pending = None  # an ObjectRef of board.get(), polled without blocking
        self._next_lookup = 0.0
        self.value: dict | None = None

    def forecast_replicas(self) -> int:
        now = time.monotonic()
        if self._actor is None:
            if now < self._next_lookup:
                return self._current()
            try:
                self._actor = ray.get_actor(self.board, namespace=BOARD_NAMESPACE)
            except ValueError:  # no forecaster yet (or Serve's default routing: none at all)
                self._next_lookup = now + 2.0
                return 0
        if self._pending is None:
            self._pending = self._actor.get.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            self._pending = None
            try:
                self.value = ray.get(ready[0])
            except ray.exceptions.RayError:  # the forecaster's replica died: look it up again
                self._actor, self.value = None, None
        return self._current()

    def _current(self) -> int:
        if self.value is None or time.time() - self.value["published_at"] > self.stale_s:
            return 0
        return int(self.value["replicas"])

    def __call__(self, ctx):
        target, state = replica_queue_length_autoscaling_policy(ctx)
        return max(target, self.forecast_replicas()), state


def collect(calls: list) -> list[dict]:
    """Wait for pre-load calls; each failure is logged and returned as {"error": ...}."""
    results = []
    for call in calls:
        try:
            results.append(call.result(timeout_s=120))
        except Exception as e:
            log.warning("a pre-load failed: %s", e)
            results.append({"error": str(e)})
    return results


class Forecaster:
    def __init__(
        self,
        engine,  # the LoraEngine deployment's handle
        app_name: str,
        interval_s: float = 60.0,
        checkpoint: str = "",
        min_score: float = 0.05,
        slots_per_replica: int = 8,
        target_ongoing: float = 4.0,
        hot_rate: float = 1.0,
        min_replicas: int = 0,
        max_replicas: int = 1,
        report_ttl_s: float = 3.0,
    ):
        from plora_jax.policies.predictive import make_forecaster

        self.engine, self.interval_s = engine, interval_s
        self.min_score, self.slots_per_replica, self.hot_rate = min_score, slots_per_replica, hot_rate
        self.target_ongoing, self.min_replicas, self.max_replicas = target_ongoing, min_replicas, max_replicas
        self.report_ttl_s = report_ttl_s  # a report older than this is from a replica that is gone
        self.model = make_forecaster(checkpoint, interval_s)
        self.board = ForecastBoard.options(
            name=board_name(app_name), namespace=BOARD_NAMESPACE, get_if_exists=True
        ).remote()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Owned by the thread; the handlers read the published copies below.
        self.paths: dict[str, str] = {}
        self.rates: dict[str, float] = {}  # adapter -> EWMA requests per second
        self.total_rate = 0.0
        self.service_s = 1.0  # EWMA of a request's gateway time (Little's law)
        self.residency: dict[str, tuple[float, dict]] = {}  # replica -> (when, its last routing stats)
        self.published: dict = {"hot": [], "replicas": 0, "forecast": {}, "plan": []}
        self.reported: dict[str, dict] = {}  # replica -> its last report (a published copy)
        self.hot: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="plora-forecaster", daemon=True)
        self.thread.start()

    # --- handlers (the replica's event loop): post to the thread, read published copies --------
    def observe(self, arrivals: dict, paths: dict, service_s: list) -> list[str]:
        """One report of the gateway's arrivals per adapter ("" is the base model), the
        adapters' folders and the service times of requests that ended; returns the hot set."""
        self.inbox.put(("observe", (arrivals, paths, service_s)))
        return sorted(self.hot)

    def report(self, replica: str, stats: dict) -> None:
        self.inbox.put(("report", (replica, stats)))

    def step(self) -> dict:
        """Run one interval now and wait for its pre-loads; returns what it published."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        self.inbox.put(("step", done))
        return done.get(timeout=120)

    def describe(self) -> dict:
        """The last interval's figures and each replica's last report."""
        return {**self.published, "residency": self.reported}

    # --- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            warm = getattr(self.model, "warm", None)
            if warm is not None:
                warm()
        except Exception:  # the first interval compiles instead; the forecaster still runs
            log.exception("forecaster warm-up failed")
        pending: Counter = Counter()
        due = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            try:
                kind, payload = self.inbox.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                kind, payload = "tick", None
            if kind == "observe":
                arrivals, paths, service_s = payload
                pending.update(arrivals)
                self.paths.update(paths)
                for s in service_s:
                    self.service_s = 0.9 * self.service_s + 0.1 * float(s)
            elif kind == "report":
                self.residency[payload[0]] = (time.monotonic(), payload[1])
                self._forget_stale()
            elif kind in ("tick", "step"):
                try:
                    published = self._interval(pending, wait=kind == "step")
                except Exception as e:  # a bad interval must not end the forecaster
                    log.exception("forecast interval failed")
                    published = {"error": str(e)}
                pending = Counter()
                due = time.monotonic() + self.interval_s
                if kind == "step":
                    payload.put(published)

    def _forget_idle(self) -> None:
        """Drop adapters whose rate has decayed to nothing (no request for some 30 intervals):
        their rates, folders and forecaster rows, so this state follows the adapters in use,
        not every id ever seen."""
        idle = [name for name, rate in self.rates.items() if rate * self.interval_s < IDLE_RATE]
        for name in idle:
            del self.rates[name]
            self.paths.pop(name, None)
        if idle:
            self.model.forget(idle)

    def _forget_stale(self) -> None:
        """Drop the reports of replicas that stopped reporting; publish the rest whole."""
        now = time.monotonic()
        self.residency = {r: (t, st) for r, (t, st) in self.residency.items() if now - t <= self.report_ttl_s}
        self.reported = {r: stats for r, (_, stats) in self.residency.items()}

    def _interval(self, counts: Counter, wait: bool) -> dict:
        alpha = 0.3
        base = counts.pop("", 0)
        self.model.update(dict(counts))
        forecast = self.model.predict()
        for name in set(self.rates) | set(counts):
            self.rates[name] = alpha * counts.get(name, 0) / self.interval_s + (1 - alpha) * self.rates.get(name, 0.0)
        self._forget_idle()
        total = (sum(counts.values()) + base) / self.interval_s
        self.total_rate = alpha * total + (1 - alpha) * self.total_rate
        self.hot = hot_adapters(self.rates, self.hot_rate)
        active = sum(forecast.values())
        replicas = replicas_needed(
            self.total_rate if self.total_rate * self.interval_s >= 0.5 else 0.0,
            self.service_s,
            self.target_ongoing,
            active,
            self.slots_per_replica,
            self.min_replicas,
            self.max_replicas,
        )
        self.board.put.remote({"replicas": replicas, "published_at": time.time()})
        self._forget_stale()
        resident = [a for _, stats in self.residency.values() for a in stats.get("device", ())]
        # No replicas forecast: pre-loading would start one, which is the autoscaler's call.
        plan = (
            [
                (a, s)
                for a, s in prefetch_plan(
                    forecast, self.slots_per_replica * replicas, self.min_score, self.hot, resident
                )
                if a in self.paths
            ]
            if replicas
            else []
        )
        on_device = set(resident)
        # A pre-load of an adapter some device holds is a no-op, unless it is to spread. It may
        # evict only adapters the forecast rates below it: a replica's own choice is LRU, which
        # would as soon evict the likeliest adapter of all.
        calls = [
            self.engine.options(multiplexed_model_id=a).prefetch.remote(
                a, self.paths[a], spread=s, keep=prefetch_keep(forecast, a)
            )
            for a, s in plan
            if s or a not in on_device
        ]
        results = []
        if wait:
            results = collect(calls)
        elif calls:  # a timer's interval does not wait; a failed pre-load is still logged
            threading.Thread(target=collect, args=(calls,), name="plora-preloads", daemon=True).start()
        self.published = {
            "hot": sorted(self.hot),
            "replicas": replicas,
            "forecast": {a: round(p, 4) for a, p in forecast.items()},
            "expected_active": round(active, 3) if math.isfinite(active) else None,
            "plan": [a for a, _ in plan],
            "prefetched": results,
        }
        return self.published

    def __del__(self):
        self._stop.set()
