"""Figures that carry their uncertainty, and goodput.

A replay is one draw: one popularity sample, one set of ranks, one set of arrival times. A
claim needs several (`WorkloadConfig.seed` changes all three) and an interval:

- `interval`: the mean of per-seed values with its 95% confidence interval, Student's t with
  n - 1 degrees of freedom (few seeds: the normal's 1.96 would be too narrow). For a ratio of
  two policies, pass the per-seed ratios (paired on the same requests), not the ratio of means.
- `goodput`: the largest arrival rate whose p90 TTFT stays within an SLO, by bisection on a
  function that replays at a given rate (p90 TTFT grows with the rate, so the set of rates
  that meet the SLO is an interval from zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """{"value": mean, "ci95": [lo, hi], "n": n}; the bounds are None with fewer than two values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("interval: no values")
    mean = math.fsum(values) / n
    if n < 2:
        return {"value": mean, "ci95": [None, None], "n": n}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"value": mean, "ci95": [mean - half, mean + half], "n": n}


def goodput(p90_ttft_at: Callable[[float], float], slo_s: float, lo: float, hi: float, rel_tol: float = 0.02) -> float:
    """The largest rate in [lo, hi] with p90_ttft_at(rate) <= slo_s, to within `rel_tol` of it
    (0.0 when even `lo` misses the SLO; `hi` when it meets it)."""
    if not 0 < lo < hi:
        raise ValueError(f"goodput: need 0 < lo < hi, got {lo}, {hi}")
    if p90_ttft_at(lo) > slo_s:
        return 0.0
    if p90_ttft_at(hi) <= slo_s:
        return hi
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        if p90_ttft_at(mid) <= slo_s:
            lo = mid
        else:
            hi = mid
    return lo
