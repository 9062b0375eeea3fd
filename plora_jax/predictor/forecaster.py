"""The trained LSTM as the runtime's forecaster, and as a scorer over a whole trace.

`LstmForecaster` implements `plora_jax.policies.Forecaster`: the predictor thread calls
`update(counts)` once per interval with every adapter's request count, which advances the LSTM
one step for all adapters at once (one jitted call over a power-of-two bucket of rows, so new
adapters cost no recompile until the bucket doubles), and `predict()` returns the latest
probabilities. Adapters seen for the first time start from a zero state, as in training.

`score_trace` runs the same model over a whole trace for offline evaluation: the score of
interval t is the output after interval t - 1, so it uses only the past.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

from .features import NUM_FEATURES, OnlineFeatures, adapter_bucket, time_features, trace_features
from .model import Predictor, load_predictor, zero_carry
from .traces import MINUTES_PER_DAY, Trace


def utc_minute_of_day() -> float:
    return (time.time() / 60.0) % MINUTES_PER_DAY


class LstmForecaster:
    def __init__(
        self,
        predictor: Predictor | str | None = None,
        interval_minutes: float = 1.0,
        minute_of_day: Callable[[], float] = utc_minute_of_day,
    ):
        """`predictor`: a loaded Predictor, a checkpoint folder, or None for the shipped one.
        `minute_of_day` gives the time of day of the interval about to start (the replay passes
        its trace clock; `interval_minutes` is only recorded for it)."""
        self.predictor = predictor if isinstance(predictor, Predictor) else load_predictor(predictor)
        self.interval_minutes = interval_minutes
        self.minute_of_day = minute_of_day
        self.rows: dict[str, int] = {}
        self._capacity = 0
        self._carry = None
        self._buckets = np.zeros((0,), np.int32)
        self._probs = np.zeros((0,), np.float32)
        self._features = OnlineFeatures()

    def _grow(self, needed: int) -> None:
        capacity = max(64, self._capacity)
        while capacity < needed:
            capacity *= 2
        if capacity == self._capacity:
            return
        fresh = zero_carry(self.predictor.model_config, capacity)
        if self._carry is not None:
            fresh = jax.tree_util.tree_map(lambda new, old: new.at[: old.shape[0]].set(old), fresh, self._carry)
        self._carry = fresh
        self._buckets = np.concatenate([self._buckets, np.zeros((capacity - self._capacity,), np.int32)])
        self._capacity = capacity

    def warm(self) -> None:
        """Compile the one-step call at the first bucket of rows (state untouched)."""
        rows = max(64, self._capacity)
        features = np.zeros((rows, 1, NUM_FEATURES), np.float32)
        probs, _ = self.predictor.run(
            features, np.zeros((rows,), np.int32), zero_carry(self.predictor.model_config, rows)
        )
        np.asarray(probs)

    def update(self, counts: Mapping[str, int]) -> None:
        for name in counts:
            if name not in self.rows:
                self.rows[name] = len(self.rows)
                self._grow(len(self.rows))
                self._buckets[self.rows[name]] = adapter_bucket(name, self.predictor.windows.num_buckets)
        if not self.rows:
            return
        observed = np.zeros((self._capacity,), np.int64)
        if counts:
            observed[[self.rows[name] for name in counts]] = list(counts.values())
        history = self._features.step(observed)
        when = np.broadcast_to(time_features(self.minute_of_day()), (self._capacity, 2))
        features = np.concatenate([history, when], axis=-1)[:, None, :]
        probs, self._carry = self.predictor.run(features, self._buckets, self._carry)
        self._probs = np.asarray(probs[:, 0])

    def predict(self) -> dict[str, float]:
        # rows are numbered in insertion order, so the names zip with the first len(rows) outputs
        return dict(zip(self.rows, self._probs[: len(self.rows)].tolist(), strict=True))

    def forget(self, names) -> None:
        """Drop the rows of `names` (adapters that left): the rows kept move up, in order, with
        their LSTM state and features; the capacity stays (no recompile)."""
        gone = set(names) & self.rows.keys()
        if not gone:
            return
        kept = [n for n in self.rows if n not in gone]
        index = np.array([self.rows[n] for n in kept], np.int64)
        self.rows = {n: i for i, n in enumerate(kept)}
        k = len(kept)
        fresh = zero_carry(self.predictor.model_config, self._capacity)
        self._carry = jax.tree_util.tree_map(lambda new, old: new.at[:k].set(old[index]), fresh, self._carry)
        self._buckets = np.concatenate([self._buckets[index], np.zeros((self._capacity - k,), np.int32)])
        self._probs = np.concatenate([self._probs[index], np.zeros((len(self._probs) - k,), np.float32)])
        self._features = self._features.select(index, self._capacity)


def score_trace(predictor: Predictor, trace: Trace, chunk: int = 512) -> np.ndarray:
    """[functions, intervals]: the probability of >= 1 request in each interval, from the past
    only: the LSTM starts from a zero state at interval 0, as `LstmForecaster` does, and its
    output after interval t - 1 scores interval t. Interval 0 (no history) gets the output of a
    separate step on an all-idle interval."""
    n, t = trace.counts.shape
    buckets = np.array([adapter_bucket(f, predictor.windows.num_buckets) for f in trace.function_ids], np.int32)
    when = time_features(trace.minute_of_day(np.arange(1, t + 1)))  # the step observing j predicts j + 1
    features = np.concatenate([trace_features(trace.counts), np.broadcast_to(when, (n, t, 2))], axis=-1)
    scores = np.zeros((n, t), np.float32)
    start_time = np.broadcast_to(time_features(trace.minute_of_day(0)), (n, 1, 2))
    idle = np.concatenate([trace_features(np.zeros((n, 1), np.int64)), start_time], -1)
    scores[:, 0] = np.asarray(predictor.run(idle, buckets)[0])[:, 0]
    carry = zero_carry(predictor.model_config, n)
    for start in range(0, t - 1, chunk):
        stop = min(start + chunk, t - 1)
        probs, carry = predictor.run(features[:, start:stop], buckets, carry)
        scores[:, start + 1 : stop + 1] = np.asarray(probs)
    return scores
