"""`histogram`: the hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., ATC'20),
applied per adapter.

For every adapter the policy keeps a histogram of idle times (the time between consecutive
requests) in bins of `bin_s` (one minute in the paper; one replay interval when time is
compressed) over `num_bins` bins (4 hours in the paper); idle times past the range are counted
as out of bounds. After each request:

- If the histogram is representative (at least `min_samples` idle times, mostly in range, and
  the coefficient of variation of its bin counts at least `cv_threshold` = 2: idle times
  concentrate in a few bins), the adapter is wanted on the device from the pre-warm point (the
  5th percentile of idle times, less a 10% margin) to the keep-alive end (the 99th percentile,
  plus a 10% margin). Before the pre-warm point it is unloaded (if no request uses it) and
  loaded again ahead of the expected next request.
- Otherwise it falls back to a fixed keep-alive: wanted from the request until `keep_alive_s`
  after it (the histogram's range by default), no pre-warming.

The paper's ARIMA branch for functions whose idle times mostly exceed the range is left out:
such adapters get the fixed keep-alive. Wanted adapters rank above the rest for eviction.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Decision, Policy, PoolView


class _Adapter:
    __slots__ = ("bins", "last", "out_of_bounds", "window")

    def __init__(self, num_bins: int):
        self.last: float | None = None
        self.bins = np.zeros((num_bins,), np.int64)
        self.out_of_bounds = 0
        self.window = (0.0, 0.0)  # (pre-warm, keep-alive end), recomputed at each request


class Histogram(Policy):
    name = "histogram"

    def __init__(
        self,
        interval_s: float = 60.0,
        bin_s: float | None = None,
        num_bins: int = 240,
        head_percentile: float = 5.0,
        tail_percentile: float = 99.0,
        margin: float = 0.1,
        cv_threshold: float = 2.0,
        min_samples: int = 5,
        max_out_of_bounds: float = 0.5,
        keep_alive_s: float | None = None,
    ):
        super().__init__(interval_s)
        self.bin_s = bin_s if bin_s is not None else interval_s
        self.num_bins = num_bins
        self.head, self.tail, self.margin = head_percentile, tail_percentile, margin
        self.cv_threshold, self.min_samples, self.max_out_of_bounds = cv_threshold, min_samples, max_out_of_bounds
        self.keep_alive_s = keep_alive_s if keep_alive_s is not None else self.bin_s * num_bins
        self._adapters: dict[str, _Adapter] = {}

    def observe(self, adapter: str | None, now: float) -> None:
        if adapter is None:
            return
        state = self._adapters.get(adapter)
        if state is None:
            state = self._adapters[adapter] = _Adapter(self.num_bins)
        if state.last is not None:
            idle_bin = int(max(0.0, now - state.last) // self.bin_s)
            if idle_bin < self.num_bins:
                state.bins[idle_bin] += 1
            else:
                state.out_of_bounds += 1
        state.last = now
        state.window = self._window(state)

    def forget(self, adapter: str) -> None:
        self._adapters.pop(adapter, None)

    def window(self, adapter: str) -> tuple[float, float]:
        """(pre-warm, keep-alive end): seconds after the last request during which `adapter` is wanted."""
        state = self._adapters.get(adapter)
        return state.window if state is not None else (math.inf, math.inf)

    def _window(self, state: _Adapter) -> tuple[float, float]:
        in_range = int(state.bins.sum())
        total = in_range + state.out_of_bounds
        if total < self.min_samples or state.out_of_bounds > self.max_out_of_bounds * total:
            return (0.0, self.keep_alive_s)
        cv = float(state.bins.std() / state.bins.mean())
        if cv < self.cv_threshold:
            return (0.0, self.keep_alive_s)
        cumulative = np.cumsum(state.bins) / in_range
        head_bin = int(np.searchsorted(cumulative, self.head / 100.0))  # first bin reaching the percentile
        tail_bin = int(np.searchsorted(cumulative, self.tail / 100.0))
        prewarm = head_bin * self.bin_s * (1.0 - self.margin)  # the bin's lower edge, less the margin
        keep_alive_end = (tail_bin + 1) * self.bin_s * (1.0 + self.margin)  # its upper edge, plus the margin
        return (prewarm, keep_alive_end)

    def decide(self, view: PoolView) -> Decision:
        wanted, evict = [], []
        for adapter, state in self._adapters.items():
            if state.last is None or adapter not in view.adapter_bytes:
                continue
            prewarm, end = state.window
            idle = view.now - state.last
            if prewarm <= idle <= end:
                wanted.append(adapter)
            elif adapter in view.on_device:
                evict.append(adapter)  # outside its window: unload (the engine keeps pinned ones)
        return Decision(
            device=[a for a in wanted if a not in view.on_device],
            evict=evict,
            priority=dict.fromkeys(wanted, 1.0),
        )
