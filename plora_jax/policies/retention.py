"""Retention: how likely an adapter is to return within a horizon longer than one interval.

A one-interval forecast ranks an adapter that returns every ten minutes below one that just had
a burst, so under pressure the returning adapter is evicted for a burst that will not come
back. In steady state those returns are most of what a forecaster still misses (evaluation
audit: at load 0.5, predictive's cold starts are adapters back after gaps of 10+ intervals).

`GapHazard` keeps each adapter's last `MAX_GAPS` gaps between arrivals and, from their
empirical distribution, the probability that its next arrival comes within `horizon_s`, given
that it has been idle for e seconds already:

    P(G <= e + horizon | G > e) = #{gaps in (e, e + horizon]} / #{gaps > e}

An adapter idle for longer than every gap it has shown (a burst that ended) scores 0; one that
returns on a schedule scores near 1 as its return nears. With fewer than `MIN_GAPS` gaps there
is no distribution yet and it scores 0, leaving the adapter to the one-interval forecast. This
is the hazard view of the idle-time histogram that Shahrad et al. (ATC'20) keep per function,
read as a probability so that it compares with a forecaster's.

Host state, owned by the loop thread (arrivals are observed there and decisions read there).
"""

from __future__ import annotations

import bisect
from collections import deque

MAX_GAPS = 32  # gaps kept per adapter: state per adapter stays bounded
MIN_GAPS = 2  # gaps an adapter must have shown before its returns are predicted


class GapHazard:
    def __init__(self, horizon_s: float):
        if horizon_s <= 0:
            raise ValueError(f"retention horizon_s must be > 0, got {horizon_s}")
        self.horizon_s = horizon_s
        self._last: dict[str, float] = {}  # each adapter's last arrival
        self._gaps: dict[str, deque[float]] = {}  # and its last MAX_GAPS gaps, oldest first

    def observe(self, adapter: str, now: float) -> None:
        last = self._last.get(adapter)
        if last is not None:
            self._gaps.setdefault(adapter, deque(maxlen=MAX_GAPS)).append(max(0.0, now - last))
        self._last[adapter] = now

    def forget(self, adapter: str) -> None:
        self._last.pop(adapter, None)
        self._gaps.pop(adapter, None)

    def probability(self, adapter: str, now: float) -> float:
        """P(the adapter's next arrival is within `horizon_s` of `now` | idle since its last)."""
        gaps = self._gaps.get(adapter)
        if gaps is None or len(gaps) < MIN_GAPS:
            return 0.0
        idle = now - self._last[adapter]
        ordered = sorted(gaps)
        longer = len(ordered) - bisect.bisect_right(ordered, idle)  # gaps it has not outlasted
        if longer == 0:
            return 0.0
        within = bisect.bisect_right(ordered, idle + self.horizon_s) - bisect.bisect_right(ordered, idle)
        return within / longer

    def scores(self, now: float) -> dict[str, float]:
        """`probability` of every adapter with a distribution, those above 0."""
        out = {}
        for adapter in self._gaps:
            p = self.probability(adapter, now)
            if p > 0:
                out[adapter] = p
        return out
