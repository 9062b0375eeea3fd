"""Retention: when an adapter that has gone quiet is expected back, from its own history.

A one-interval forecast ranks an adapter that returns every forty minutes below one that just
had a burst, so under pressure the returning adapter may be evicted for a burst that will not
come back. In steady state those returns are most of what a forecaster still misses
(evaluation audit: at load 0.5, predictive's cold starts are adapters back after gaps of 10+
intervals).

`GapHazard` keeps each adapter's last `MAX_GAPS` idle gaps (gaps between arrivals of at least
`min_gap_s`, one policy interval: shorter ones are inside a burst, and a burst of more than
`MAX_GAPS` requests would push every idle gap out) and, given that the adapter has been idle
for e seconds, its expected wait until the next arrival over the gaps it has not outlasted:

    E[G - e | G > e]

An adapter idle for longer than every gap it has shown (a burst that ended) has none; with
fewer than `MIN_GAPS` gaps there is no distribution yet. This is the residual-life view of the
idle-time histogram Shahrad et al. (ATC'20) keep per function. `Predictive` ranks eviction by
the sooner of this wait and the one its forecast implies.

Measured (the retention paragraph of docs/serverless.md), it does not pay on the Azure trace: the adapters
predictive misses return after gaps too irregular for their own few gaps to time, so it is off
by default (`RETENTION_INTERVALS` 0).

Host state, owned by the loop thread (arrivals are observed there and decisions read there).
"""

from __future__ import annotations

from collections import deque

RETENTION_INTERVALS = 0.0  # predictive's default horizon for returns, in policy intervals (0: off)
MAX_GAPS = 32  # gaps kept per adapter: state per adapter stays bounded
MIN_GAPS = 2  # gaps an adapter must have shown before its returns are predicted


class GapHazard:
    def __init__(self, horizon_s: float, min_gap_s: float = 0.0):
        if horizon_s <= 0:
            raise ValueError(f"retention horizon_s must be > 0, got {horizon_s}")
        self.horizon_s = horizon_s  # returns expected further away than this are not reported
        self.min_gap_s = min_gap_s  # shorter gaps are inside a burst: not recorded
        self._last: dict[str, float] = {}  # each adapter's last arrival
        self._gaps: dict[str, deque[float]] = {}  # and its last MAX_GAPS idle gaps, oldest first

    def observe(self, adapter: str, now: float) -> None:
        last = self._last.get(adapter)
        if last is not None and now - last >= self.min_gap_s:
            self._gaps.setdefault(adapter, deque(maxlen=MAX_GAPS)).append(now - last)
        self._last[adapter] = now

    def forget(self, adapter: str) -> None:
        self._last.pop(adapter, None)
        self._gaps.pop(adapter, None)

    def expected_wait(self, adapter: str, now: float) -> float | None:
        """Seconds until the adapter's next arrival, expected from the gaps it has not outlasted
        yet: E[G - e | G > e] with e its idle time. None without a distribution, or once it has
        been idle longer than every gap it has shown."""
        gaps = self._gaps.get(adapter)
        if gaps is None or len(gaps) < MIN_GAPS:
            return None
        idle = now - self._last[adapter]
        longer = [g - idle for g in gaps if g > idle]
        return sum(longer) / len(longer) if longer else None

    def waits(self, now: float) -> dict[str, float]:
        """`expected_wait` of every adapter expected back within `horizon_s`."""
        out = {}
        for adapter in self._gaps:
            wait = self.expected_wait(adapter, now)
            if wait is not None and wait <= self.horizon_s:
                out[adapter] = wait
        return out
