"""From traces to training examples: a Grain pipeline of sliding windows over the features of
`plora_jax.predictor.features`.

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
- the gap hazard (`features.GapHazard`: how often f's past gaps ended one interval after an idle
  run as long as the current one),
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

import numpy as np

from plora_jax.predictor.features import WindowConfig, adapter_bucket, time_features, trace_features
from plora_jax.predictor.traces import Trace


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
