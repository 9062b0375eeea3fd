"""From traces to training examples: a Grain pipeline of sliding windows.

The forecaster is an LSTM that runs online: each interval the runtime feeds every adapter's
request count of the interval that just ended, and the LSTM, carrying its state, outputs the
probability that the adapter gets at least one request in the next `horizon` intervals. One
step per interval costs one LSTM cell per adapter, which is what keeps a prediction over
thousands of adapters within a few milliseconds.

Training examples are windows of that online run. A window of function f starting at interval s
has `window` steps; step j sees `features[j]`, all from intervals up to s + j:
- the count of interval s + j (the interval just observed): log1p(count) / COUNT_SCALE,
- the intervals since f's last request, and between its last two requested intervals (log-scaled,
  from the whole past, not only the window: the previous gap is what reveals a timer's period),
- the requests of the last `HOUR` intervals (log-scaled),
- sin and cos of the time of day at which interval s + j + 1 starts (the one predicted),
and `bucket`, a stable CRC32 bucket of f's id for the adapter embedding (an adapter never seen in
training still has a bucket). Recency and the hourly count are what the strong baselines use;
given as inputs, the LSTM does not have to rebuild them from a truncated window.
and its target is whether f has >= 1 request in intervals s + j + 1 .. s + j + horizon
(`target_count`: how many). The LSTM starts each window from a zero state, as it does for an
adapter registered at run time; the first `burn_in` steps of a window carry no loss
(`mask` = 0), so the model learns to predict from a state that has seen some history.

Windows start every `stride` intervals. The pipeline is a `grain.MapDataset` over example
indices, shuffled with a seed, batched, then mapped batch-wise to arrays by one vectorised
gather (per-example Python would dominate a CPU epoch).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .traces import MINUTES_PER_DAY, Trace

COUNT_SCALE = float(np.log1p(1000.0))  # log1p(count) / COUNT_SCALE: 1000 requests per interval -> 1.0
HOUR = 60  # intervals in the "last hour" feature (one trace minute per interval by default)
NEVER = 1440  # intervals since the last request when there was none (a day)
NUM_FEATURES = 6  # count, since last request, previous gap, last-hour count, sin and cos of the time of day


@dataclass(frozen=True)
class WindowConfig:
    window: int = 128  # steps per training window
    horizon: int = 1  # target: at least one request within this many intervals after the step
    burn_in: int = 8  # first steps of a window without loss
    stride: int = 64  # intervals between window starts
    num_buckets: int = 1024  # hashed adapter-id buckets of the embedding

    def __post_init__(self):
        for name in ("window", "horizon", "stride", "num_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.burn_in < self.window:
            raise ValueError(f"burn_in must be in [0, window), got {self.burn_in}")


def adapter_bucket(adapter_id: str, num_buckets: int) -> int:
    return zlib.crc32(adapter_id.encode()) % num_buckets


def count_features(counts) -> np.ndarray:
    return (np.log1p(np.asarray(counts, np.float64)) / COUNT_SCALE).astype(np.float32)


def time_features(minute_of_day) -> np.ndarray:
    """[..., 2]: sin and cos of the time of day."""
    angle = 2 * np.pi * np.asarray(minute_of_day, np.float64) / MINUTES_PER_DAY
    return np.stack([np.sin(angle), np.cos(angle)], -1).astype(np.float32)


def _log_intervals(n) -> np.ndarray:
    return (np.log1p(np.minimum(n, NEVER)) / np.log1p(NEVER)).astype(np.float32)


def history_features(counts, since, gap, hour_count) -> np.ndarray:
    """[..., 4] from an interval's count, the intervals since the last request (0: in this
    interval), the gap between the last two requested intervals (`NEVER` if fewer than two) and
    the requests of the last `HOUR` intervals (this one included)."""
    return np.stack(
        [count_features(counts), _log_intervals(since), _log_intervals(gap), count_features(hour_count)], -1
    )


def trace_features(counts: np.ndarray) -> np.ndarray:
    """[functions, intervals, 4]: `history_features` of every interval of a trace, from its past
    only (before interval 0 the function is taken as never requested)."""
    n, t = counts.shape
    steps = np.arange(t)
    active = counts > 0
    last = np.maximum.accumulate(np.where(active, steps[None, :], -NEVER - 1), axis=1)  # last active <= t
    before = np.concatenate([np.full((n, 1), -NEVER - 1), last[:, :-1]], axis=1)  # last active < t
    gap_here = np.where(active, steps[None, :] - before, NEVER)  # at each requested interval
    rows = np.arange(n)[:, None]
    gap = np.where(last >= 0, gap_here[rows, np.maximum(last, 0)], NEVER)
    cum = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    hour = cum[:, steps + 1] - cum[:, np.maximum(steps + 1 - HOUR, 0)]
    return history_features(counts, steps[None, :] - last, gap, hour)


class OnlineFeatures:
    """The same features, one interval at a time, for rows that may be added later (the runtime)."""

    def __init__(self):
        self.since = np.zeros((0,), np.int64)
        self.gap = np.zeros((0,), np.int64)
        self.recent = np.zeros((0, HOUR), np.int64)  # ring of the last HOUR counts
        self.hour_sum = np.zeros((0,), np.int64)
        self.position = 0

    def grow(self, rows: int) -> None:
        extra = rows - len(self.since)
        if extra > 0:
            self.since = np.concatenate([self.since, np.full((extra,), NEVER, np.int64)])
            self.gap = np.concatenate([self.gap, np.full((extra,), NEVER, np.int64)])
            self.recent = np.concatenate([self.recent, np.zeros((extra, HOUR), np.int64)])
            self.hour_sum = np.concatenate([self.hour_sum, np.zeros((extra,), np.int64)])

    def step(self, counts: np.ndarray) -> np.ndarray:
        """[rows, 4] after observing `counts` [rows] of the interval that just ended."""
        self.grow(len(counts))
        active = counts > 0
        self.gap = np.where(active, np.minimum(self.since + 1, NEVER), self.gap)
        self.since = np.where(active, 0, np.minimum(self.since + 1, NEVER))
        self.hour_sum += counts - self.recent[:, self.position]
        self.recent[:, self.position] = counts
        self.position = (self.position + 1) % HOUR
        return history_features(counts, self.since, self.gap, self.hour_sum)


class Windows:
    """Every training window of one trace (window starts s = 0, stride, 2 * stride, ...)."""

    def __init__(self, trace: Trace, config: WindowConfig):
        self.trace, self.config = trace, config
        last_start = trace.num_intervals - config.horizon - config.window
        if last_start < 0:
            raise ValueError(
                f"{trace.path}: {trace.num_intervals} intervals are too few for windows of {config.window} "
                f"steps with horizon {config.horizon}"
            )
        self.starts = np.arange(0, last_start + 1, config.stride)
        self._features = trace_features(trace.counts)
        # cumulative counts: the count over intervals [a, b) is cum[:, b] - cum[:, a]
        self._cum = np.concatenate(
            [np.zeros((trace.num_functions, 1), np.int64), np.cumsum(trace.counts, axis=1)], axis=1
        )
        self._buckets = np.array([adapter_bucket(f, config.num_buckets) for f in trace.function_ids], np.int32)
        self._mask = (np.arange(config.window) >= config.burn_in).astype(np.float32)

    def __len__(self) -> int:
        return self.trace.num_functions * len(self.starts)

    def example_index(self, flat) -> tuple[np.ndarray, np.ndarray]:
        """Flat example ids -> (function row, window start)."""
        flat = np.asarray(flat)
        return flat // len(self.starts), self.starts[flat % len(self.starts)]

    def batch(self, rows: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        w, h = self.config.window, self.config.horizon
        steps = starts[:, None] + np.arange(w)[None, :]  # interval observed at each step
        rows2 = rows[:, None]
        count = self._cum[rows2, steps + 1 + h] - self._cum[rows2, steps + 1]
        return {
            "features": np.concatenate(
                [self._features[rows2, steps], time_features(self.trace.minute_of_day(steps + 1))], axis=-1
            ),
            "bucket": self._buckets[rows],
            "target": (count >= 1).astype(np.float32),
            "target_count": count.astype(np.float32),
            "mask": np.broadcast_to(self._mask, steps.shape).copy(),
        }

    def dataset(self, batch_size: int, seed: int | None = None):
        """A Grain MapDataset of batches (shuffled when `seed` is given; the last batch may be short)."""
        import grain

        ds = grain.MapDataset.range(len(self))
        if seed is not None:
            ds = ds.shuffle(seed=seed)
        return ds.batch(batch_size).map(lambda flat: self.batch(*self.example_index(flat)))
