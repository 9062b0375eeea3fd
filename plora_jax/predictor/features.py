"""The forecaster's input features, computed the same way offline (a whole trace at once) and
online (one interval at a time, for adapters registered at run time).

The forecaster is an LSTM that runs online: each interval the runtime feeds every adapter's
request count of the interval that just ended, and the LSTM, carrying its state, outputs the
probability that the adapter gets at least one request in the next `horizon` intervals. One
step per interval costs one LSTM cell per adapter, which is what keeps a prediction over
thousands of adapters within a few milliseconds.

Step j of a run sees, all from intervals up to j:
- the count of interval j (the interval just observed): log1p(count) / COUNT_SCALE,
- the intervals since the adapter's last request, and between its last two requested intervals
  (log-scaled, from the whole past: the previous gap is what reveals a timer's period),
- the requests of the last `HOUR` intervals (log-scaled),
- the gap hazard: of the adapter's past gaps (between requested intervals) at least as long as
  the current idle run, the fraction that ended one interval from now, give or take one
  (`gap_hazard`). A timer with a fixed period has a hazard near 1 exactly where its next request
  falls; the log-scaled "since" and "gap" inputs alone cannot resolve 59 from 60 intervals, and
  the offline evaluation showed the LSTM missing such timers at every period,
- sin and cos of the time of day at which interval j + 1 starts (the one predicted),
and `bucket`, a stable CRC32 bucket of the adapter's id for the embedding (an adapter never seen
in training still has a bucket). Recency and the hourly count are what the strong baselines
use; given as inputs, the LSTM does not have to rebuild them from a truncated window.

`WindowConfig` is saved with every checkpoint: the model's embedding size and the horizon it
was trained for come from it. The training windows themselves are built by
`train_predictor.windows`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .traces import MINUTES_PER_DAY

COUNT_SCALE = float(np.log1p(1000.0))  # log1p(count) / COUNT_SCALE: 1000 requests per interval -> 1.0
HOUR = 60  # intervals in the "last hour" feature (one trace minute per interval by default)
NEVER = 1440  # intervals since the last request when there was none (a day)
HAZARD_SPAN = 240  # gaps this long or longer are one "long" bin; idle runs past it get hazard 0
NUM_HISTORY = 5  # count, since last request, previous gap, last-hour count, gap hazard
NUM_FEATURES = NUM_HISTORY + 2  # and sin and cos of the time of day


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


def history_features(counts, since, gap, hour_count, hazard) -> np.ndarray:
    """[..., NUM_HISTORY] from an interval's count, the intervals since the last request (0: in
    this interval), the gap between the last two requested intervals (`NEVER` if fewer than two),
    the requests of the last `HOUR` intervals (this one included) and the gap hazard."""
    return np.stack(
        [
            count_features(counts),
            _log_intervals(since),
            _log_intervals(gap),
            count_features(hour_count),
            np.asarray(hazard, np.float32),
        ],
        -1,
    )


class GapHazard:
    """Per row, a histogram of its past gaps and, for every idle length s, how many gaps were at
    least s long; both updated only at requested intervals, so a step costs O(rows) reads plus
    O(HAZARD_SPAN) per requesting row. The hazard after an idle run of s intervals is
    #(gaps in [s, s + 2]) / (1 + #(gaps >= s)): a request next interval closes a gap of s + 1,
    one interval of slack on either side absorbs a timer's jitter, and the 1 shrinks the estimate
    of a row with few gaps towards 0."""

    def __init__(self):
        self.histogram = np.zeros((0, HAZARD_SPAN + 3), np.int32)  # [rows, gap bins] (bin HAZARD_SPAN: long)
        self.at_least = np.zeros((0, HAZARD_SPAN + 1), np.int32)  # [rows, s]: gaps >= s
        self.seen = np.zeros((0,), bool)  # [rows]: requested before (a first request closes no gap)

    def grow(self, extra: int) -> None:
        self.histogram = np.concatenate([self.histogram, np.zeros((extra, HAZARD_SPAN + 3), np.int32)])
        self.at_least = np.concatenate([self.at_least, np.zeros((extra, HAZARD_SPAN + 1), np.int32)])
        self.seen = np.concatenate([self.seen, np.zeros((extra,), bool)])

    def select(self, rows: np.ndarray) -> GapHazard:
        out = GapHazard()
        out.histogram, out.at_least, out.seen = self.histogram[rows], self.at_least[rows], self.seen[rows]
        return out

    def step(self, active: np.ndarray, since_before: np.ndarray, since: np.ndarray) -> np.ndarray:
        """[rows] hazard after an interval: `active` [rows] rows requested in it, `since_before`
        and `since` [rows] intervals since their last request before and after it."""
        closing = np.flatnonzero(active & self.seen)
        if len(closing):
            gaps = np.minimum(since_before[closing] + 1, HAZARD_SPAN)
            self.histogram[closing, gaps] += 1
            self.at_least[closing] += np.arange(HAZARD_SPAN + 1)[None, :] <= gaps[:, None]
        self.seen |= active
        rows = np.arange(len(since))
        s = np.minimum(since, HAZARD_SPAN)
        ending = self.histogram[rows, s] + self.histogram[rows, s + 1] + self.histogram[rows, s + 2]
        hazard = ending / (1.0 + self.at_least[rows, s])
        return np.where(since + 1 < HAZARD_SPAN, hazard, 0.0).astype(np.float32)


def trace_hazard(counts: np.ndarray) -> np.ndarray:
    """[functions, intervals]: `GapHazard` after every interval of a trace."""
    n, t = counts.shape
    hazard = GapHazard()
    hazard.grow(n)
    out = np.zeros((n, t), np.float32)
    since = np.full((n,), NEVER, np.int64)
    for j in range(t):
        active = counts[:, j] > 0
        after = np.where(active, 0, np.minimum(since + 1, NEVER))
        out[:, j] = hazard.step(active, since, after)
        since = after
    return out


def trace_features(counts: np.ndarray) -> np.ndarray:
    """[functions, intervals, NUM_HISTORY]: `history_features` of every interval of a trace, from
    its past only (before interval 0 the function is taken as never requested)."""
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
    return history_features(counts, steps[None, :] - last, gap, hour, trace_hazard(counts))


class OnlineFeatures:
    """The same features, one interval at a time, for rows that may be added later (the runtime)."""

    def __init__(self):
        self.since = np.zeros((0,), np.int64)
        self.gap = np.zeros((0,), np.int64)
        self.recent = np.zeros((0, HOUR), np.int64)  # ring of the last HOUR counts
        self.hour_sum = np.zeros((0,), np.int64)
        self.position = 0
        self.hazard = GapHazard()

    def grow(self, rows: int) -> None:
        extra = rows - len(self.since)
        if extra > 0:
            self.since = np.concatenate([self.since, np.full((extra,), NEVER, np.int64)])
            self.gap = np.concatenate([self.gap, np.full((extra,), NEVER, np.int64)])
            self.recent = np.concatenate([self.recent, np.zeros((extra, HOUR), np.int64)])
            self.hour_sum = np.concatenate([self.hour_sum, np.zeros((extra,), np.int64)])
            self.hazard.grow(extra)

    def select(self, rows: np.ndarray, total: int) -> OnlineFeatures:
        """These features with only `rows` kept (in that order), then fresh rows up to `total`."""
        out = OnlineFeatures()
        out.since, out.gap = self.since[rows], self.gap[rows]
        out.recent, out.hour_sum, out.position = self.recent[rows], self.hour_sum[rows], self.position
        out.hazard = self.hazard.select(rows)
        out.grow(total)
        return out

    def step(self, counts: np.ndarray) -> np.ndarray:
        """[rows, NUM_HISTORY] after observing `counts` [rows] of the interval that just ended."""
        self.grow(len(counts))
        active = counts > 0
        since_before = self.since
        self.gap = np.where(active, np.minimum(self.since + 1, NEVER), self.gap)
        self.since = np.where(active, 0, np.minimum(self.since + 1, NEVER))
        hazard = self.hazard.step(active, since_before, self.since)
        self.hour_sum += counts - self.recent[:, self.position]
        self.recent[:, self.position] = counts
        self.position = (self.position + 1) % HOUR
        return history_features(counts, self.since, self.gap, self.hour_sum, hazard)
