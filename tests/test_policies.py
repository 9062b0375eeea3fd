"""Each residency policy on a small hand-made arrival sequence, with the prefetch and eviction
decisions it must take (pure: no engine, time given explicitly)."""

import math
import threading
import time

import numpy as np
import pytest

from plora_jax.policies import (
    POLICIES,
    EwmaForecaster,
    Histogram,
    Lookahead,
    Lru,
    Oracle,
    Predictive,
    PredictorUnavailable,
    Reactive,
    make_policy,
)
from plora_jax.policies.base import PoolView, fill_tiers, rank_to_fit
from plora_jax.policies.retention import GapHazard

SIZE = 100


def view(
    now=0.0, on_device=(), queued=(), names="abcd", device_bytes=2 * SIZE, slots=4, host_bytes=0, disk_bytes=0, **kw
):
    sizes = dict.fromkeys(names, SIZE) | kw.pop("sizes", {})
    return PoolView(
        now=now,
        registered=tuple(sizes),
        on_device=frozenset(on_device),
        on_host=frozenset(kw.pop("on_host", ())),
        on_disk=frozenset(kw.pop("on_disk", ())),
        pinned=frozenset(kw.pop("pinned", ())),
        queued=tuple(queued),
        adapter_bytes=sizes,
        device_bytes=device_bytes,
        device_slots=slots,
        host_bytes=host_bytes,
        disk_bytes=disk_bytes,
    )


def test_registry_and_rank_to_fit():
    assert set(POLICIES) == {
        *("reactive", "lru", "lookahead", "histogram", "predictive", "slora", "slora_prefetch"),
        *("oracle", "causal_oracle"),
    }
    assert make_policy("lru", interval_s=2.0).interval_s == 2.0
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="interval_s"):
        make_policy("reactive", interval_s=0)
    v = view(sizes={"big": 3 * SIZE}, names="ab")
    # "big" does not fit what is left, the smaller one after it still does; the count caps it.
    assert rank_to_fit(["a", "big", "b"], v, 2 * SIZE, 4) == ["a", "b"]
    assert rank_to_fit(["a", "b"], v, 2 * SIZE, 1) == ["a"]


def test_reactive_and_lru_prefetch_nothing():
    reactive, lru = Reactive(), Lru()
    for t, name in enumerate("abca"):
        reactive.observe(name, float(t))
        lru.observe(name, float(t))
    for policy in (reactive, lru):
        decision = policy.decide(view(now=4.0, on_device="ab", queued="cd"))
        assert decision.device == [] and decision.host == [] and decision.evict == [] and decision.priority == {}
    assert reactive.free_when_unused and not lru.free_when_unused


def test_lookahead_prefetches_queued_adapters_in_queue_order():
    decision = Lookahead().decide(view(queued=["c", "a", "c", "b"], on_device="a"))
    assert decision.device == ["c", "b"]  # "a" is resident already; "c" once
    assert decision.priority == {"c": 1.0, "a": 1.0, "b": 1.0}  # queued adapters are kept
    assert Lookahead().decide(view()).device == []


def test_histogram_prewarms_at_the_head_and_keeps_alive_to_the_tail():
    policy = Histogram(interval_s=60.0)
    # "p" is periodic: a request every 5 minutes, 10 idle times all in bin 5 (a representative,
    # high-CV histogram). Window: pre-warm 5 * 60 * 0.9 = 270 s, keep alive to 6 * 60 * 1.1 = 396 s.
    for k in range(11):
        policy.observe("p", 300.0 * k)
    # "q" has 2 requests: too few idle times, so the fixed keep-alive (the histogram's range).
    policy.observe("q", 2900.0)
    policy.observe("q", 2950.0)
    # "r" has idle times spread evenly over 100 bins: CV < 2, not representative, fixed keep-alive.
    t = 0.0
    for k in range(100):
        t += 60.0 * k + 1.0
        policy.observe("r", t)
    assert policy.window("p") == pytest.approx((270.0, 396.0))
    assert policy.window("q") == (0.0, 240 * 60.0)
    assert policy.window("r") == (0.0, 240 * 60.0)
    last_p = 3000.0
    names = "pq"  # r's clock runs far ahead; it is left out of the views below (not registered)
    # Just after p's request: p is unloaded (before its pre-warm point), q stays (fixed keep-alive).
    d = policy.decide(view(now=last_p + 100, on_device="pq", names=names))
    assert d.evict == ["p"] and d.device == [] and d.priority == {"q": 1.0}
    # Past the pre-warm point: p is loaded ahead of its expected request.
    d = policy.decide(view(now=last_p + 280, on_device="q", names=names))
    assert d.device == ["p"] and d.evict == [] and d.priority["p"] == 1.0
    # Past the keep-alive end: p goes again.
    d = policy.decide(view(now=last_p + 400, on_device="pq", names=names))
    assert d.evict == ["p"]
    # Beyond the range, q expires too.
    d = policy.decide(view(now=last_p + 240 * 60 + 1, on_device="pq", names=names))
    assert sorted(d.evict) == ["p", "q"] and d.priority == {}


class FixedForecaster:
    """A forecaster whose scores are set by the test."""

    def __init__(self, scores):
        self.scores, self.updates = dict(scores), []

    def update(self, counts):
        self.updates.append(dict(counts))

    def predict(self):
        return dict(self.scores)

    def forget(self, names):
        for name in names:
            self.scores.pop(name, None)


def test_ewma_forecaster_is_exact():
    f = EwmaForecaster(alpha=0.5)
    f.update({"a": 2})
    assert f.predict() == pytest.approx({"a": 1 - np.exp(-1.0)})
    f.update({"b": 1})
    assert f.predict() == pytest.approx({"a": 1 - np.exp(-0.5), "b": 1 - np.exp(-0.5)})


def test_predictive_takes_the_top_forecast_that_fits_with_hysteresis():
    forecaster = FixedForecaster({"a": 0.9, "b": 0.5, "c": 0.2, "d": 0.01})
    policy = Predictive(forecaster, interval_s=1.0)
    for name in "aab":
        policy.observe(name, 0.0)
    policy.step()
    assert forecaster.updates == [{"a": 2, "b": 1}]
    d = policy.decide(view(on_device="c", host_bytes=SIZE))
    assert d.device == ["a", "b"]  # two fit the pool
    assert d.host == ["c"]  # the next one goes to the host cache; "d" is under min_score
    assert d.priority["a"] == pytest.approx(2.0) and d.priority["b"] == pytest.approx(1 + 0.5 / 0.9)
    assert d.priority["c"] == pytest.approx(0.2 / 0.9) and d.priority["d"] == pytest.approx(0.01 / 0.9)
    # Demand per byte: a large adapter with the same score ranks lower for eviction.
    d = policy.decide(view(sizes={"b": 4 * SIZE}, device_bytes=SIZE))
    assert d.priority["b"] == pytest.approx(0.5 / 4 / 0.9)
    # Hysteresis: a resident adapter is not swapped for one scoring slightly higher.
    forecaster.scores = {"a": 0.5, "b": 0.45}
    policy.step()
    assert policy.decide(view(on_device="b", slots=1)).device == []
    assert policy.decide(view(on_device="", slots=1)).device == ["a"]
    # Queued requests' adapters come first, whatever their score.
    assert policy.decide(view(queued="d")).device == ["d", "a"]


def test_the_gap_hazard_expects_a_return_from_the_gaps_not_outlasted():
    hazard = GapHazard(horizon_s=5.0, min_gap_s=1.0)
    for t in (0.0, 10.0, 20.0, 34.0, 34.5):  # gaps 10, 10, 14; 0.5 is inside a burst: not one
        hazard.observe("a", t)
    # idle 1.5 s: every gap is longer: (8.5 + 8.5 + 12.5) / 3
    assert hazard.expected_wait("a", 36.0) == pytest.approx(29.5 / 3)
    assert hazard.expected_wait("a", 45.0) == pytest.approx(3.5)  # idle 10.5 s: only the 14 s gap is left
    assert hazard.expected_wait("a", 49.0) is None  # idle 14.5 s: longer than every gap it has shown
    assert hazard.waits(45.0) == {"a": pytest.approx(3.5)} and hazard.waits(36.0) == {}  # 9.8 s: past 5
    hazard.observe("b", 0.0)
    hazard.observe("b", 2.0)
    assert hazard.expected_wait("b", 2.5) is None  # one gap: no distribution yet
    hazard.forget("a")
    assert hazard.waits(45.0) == {}


def test_predictive_retention_keeps_an_adapter_that_returns_over_one_whose_burst_ended():
    """a returns every 10 intervals; b had a burst 3 intervals ago. The one-interval forecast
    ranks b above a for eviction; retention (10 intervals) expects a back in 2 and ranks it first."""
    forecaster = FixedForecaster({"a": 0.05, "b": 0.3})
    with_retention = Predictive(forecaster, interval_s=1.0, retention_intervals=10.0)
    without = Predictive(forecaster, interval_s=1.0)  # the default: retention off
    assert without.retention is None
    for policy in (with_retention, without):
        for t in (0.0, 10.0, 20.0, 30.0, 35.0, 35.1, 35.2, 35.3):  # b's burst: a's arrivals then b's
            policy.observe("a" if t <= 30.0 else "b", t)
        policy.step()
    v = view(now=38.0, on_device="ab", slots=0, device_bytes=0)  # nothing wanted: priority alone
    kept = with_retention.decide(v).priority
    back_in_2 = 1 - np.exp(-1 / 2)  # a's chance of a request next interval at a mean wait of 2
    assert kept["a"] == pytest.approx(1.0) and kept["b"] == pytest.approx(0.3 / back_in_2)
    alone = without.decide(v).priority
    assert alone["a"] < alone["b"]


def test_predictive_raises_when_the_forecaster_fails_and_recovers():
    forecaster = FixedForecaster({"a": 0.9})
    policy = Predictive(forecaster, interval_s=1.0)
    broken = forecaster.update
    forecaster.update = lambda counts: 1 / 0
    with pytest.raises(ZeroDivisionError):
        policy.step()
    with pytest.raises(PredictorUnavailable, match="ZeroDivisionError"):
        policy.decide(view())
    forecaster.update = broken
    policy.step()
    assert policy.decide(view()).device == ["a"]
    assert policy.stats()["predictor_failures"] == 1 and policy.stats()["predictor_runs"] == 1


def test_predictive_thread_runs_each_interval_and_a_stall_is_reported():
    gate = threading.Event()
    forecaster = FixedForecaster({"a": 0.9})
    policy = Predictive(forecaster, interval_s=0.05, stall_intervals=3, min_stall_s=0.0)
    policy.start()
    try:
        deadline = time.monotonic() + 10
        while policy.stats()["predictor_runs"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert policy.stats()["predictor_runs"] >= 3
        assert policy.decide(view(now=time.monotonic())).device == ["a"]
        forecaster.update = lambda counts: gate.wait(10)  # the forecaster hangs
        time.sleep(0.4)
        with pytest.raises(PredictorUnavailable, match="no forecast"):
            policy.decide(view(now=time.monotonic()))
        gate.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                policy.decide(view(now=time.monotonic()))
                break
            except PredictorUnavailable:
                time.sleep(0.02)
        else:
            pytest.fail("the predictor did not recover")
    finally:
        gate.set()
        policy.close()


def test_oracle_prefetches_the_next_arrivals_and_evicts_the_furthest():
    arrivals = [(10.0, "a"), (12.0, "b"), (50.0, "c"), (11.0, "a"), (13.0, "d")]
    policy = Oracle(arrivals, interval_s=1.0, horizon_s=5.0)
    policy.set_origin(100.0)
    d = policy.decide(view(now=108.0, on_device="c"))
    assert d.device == ["a", "b"]  # next in 2 s and 4 s; "d" (5 s) does not fit two slots' bytes
    assert d.priority == {"a": 4.0, "b": 3.0, "d": 2.0, "c": 1.0}  # used soonest: kept longest
    assert policy.next_arrival("a", 110.5) == pytest.approx(0.5)
    d = policy.decide(view(now=113.5, on_device="ab"))
    assert d.device == [] and d.priority == {"c": 1.0}  # a, b, d: never again


def test_the_forecast_reaches_every_tier_as_deep_as_there_is_room():
    """Ranked a..e: the device holds two, the host one more, the node cache one more; what a
    tier already holds takes no room there and is not asked for again."""
    v = view(names="abcde", host_bytes=SIZE, disk_bytes=SIZE)
    assert fill_tiers(list("abcde"), v) == (["a", "b"], ["c"], ["d"])
    v = view(names="abcde", host_bytes=SIZE, disk_bytes=SIZE, on_host="c")  # c takes no host room
    assert fill_tiers(list("abcde"), v) == (["a", "b"], ["d"], ["e"])
    v = view(names="abcde", host_bytes=SIZE, disk_bytes=SIZE, on_disk="d")
    assert fill_tiers(list("abcde"), v) == (["a", "b"], ["c"], ["e"])
    # The oracle fetches into the node cache what comes beyond its horizon, soonest first, even
    # where the host cache has room to spare (only what is within the horizon is read into it).
    policy = Oracle([(1.0, "a"), (2.0, "b"), (3.0, "c"), (30.0, "e"), (20.0, "d")], interval_s=1.0, horizon_s=5.0)
    d = policy.decide(view(names="abcde", host_bytes=3 * SIZE, disk_bytes=SIZE))
    assert (d.device, d.host, d.disk) == (["a", "b"], ["c"], ["d"])


def test_forecasters_forget_an_adapter_as_if_they_had_never_seen_it():
    """An adapter that left is dropped from the forecaster's rows: the others' predictions are
    exactly those of a forecaster that never saw it, now and after more intervals (the LSTM's
    rows, state and features move up together)."""
    from plora_jax.predictor.forecaster import LstmForecaster

    rng = np.random.default_rng(0)
    for make in (EwmaForecaster, lambda: LstmForecaster(None)):
        full, without = make(), make()
        for _ in range(5):
            counts = {name: int(rng.integers(0, 3)) for name in ("a", "gone", "c")}
            full.update(counts)
            without.update({n: c for n, c in counts.items() if n != "gone"})
        full.forget(["gone"])
        assert "gone" not in full.predict()
        for _ in range(3):
            np.testing.assert_allclose(
                [full.predict()[n] for n in "ac"], [without.predict()[n] for n in "ac"], rtol=1e-5, atol=1e-6
            )
            counts = {"a": int(rng.integers(0, 3)), "c": 1}
            full.update(counts)
            without.update(counts)


def test_per_adapter_and_per_interval_state_stays_bounded():
    """Forecast latencies are running aggregates (the engine reads them after every step), and
    a policy forgets an adapter that was unregistered."""

    class Instant:
        def update(self, counts):
            pass

        def predict(self):
            return {"a": 0.5}

        def forget(self, names):

            pass  # nothing kept per adapter

    policy = Predictive(Instant(), interval_s=1.0)
    for _ in range(2000):
        policy.step()
    assert policy.stats()["predictor_runs"] == 2000
    assert all(len(v) < 10 for v in vars(policy).values() if isinstance(v, (list, dict, set)))
    policy.forget("a")
    assert policy._scores == {}
    histogram = Histogram(interval_s=1.0)
    histogram.observe("a", 0.0)
    histogram.forget("a")
    assert histogram.window("a") == (math.inf, math.inf)
