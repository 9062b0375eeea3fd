"""Readers for the Azure Functions per-minute invocation traces, popularity-matched sampling, and
splits by function and by time.

Every invocation-count CSV in `shared/data/azure/` is one row per function and one column per
minute, in one of two header styles:

- `HashFunction,HashOwner,HashApp,minute_1,...,minute_1440` (the full-day pool; ids re-keyed,
  no Trigger), where `minute_k` is minute k of the day;
- `HashOwner,HashApp,HashFunction,Trigger,480,...,959` (the 8-hour slice; original ids), where
  the numbered columns are the Azure file's minute columns (also 1-based).

`read_trace` accepts both (with or without Trigger, id columns in any order) and returns a
`Trace`: counts `[functions, minutes]` plus the minute of day of the first column, which is what
the time-of-day features need. Bad data raises `TraceError` naming the file and the row.

The full-day pool keeps about one row per distinct daily total, so it is far busier than Azure
(its README): `sample_popularity` draws N functions whose daily totals follow a reference
distribution (by default the representative In-Vitro sample quoted there), re-using light rows
where needed, as the In-Vitro samples do.
"""

from __future__ import annotations

import csv
import itertools
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ID_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
MINUTES_PER_DAY = 1440
# Daily invocation totals of In-Vitro's representative sample `1350_inv.csv` (quantile -> total),
# from shared/data/README.md; zero-invocation functions were dropped by that sampler.
REFERENCE_DAILY_QUANTILES = {
    0.0: 1.0,
    0.10: 1.0,
    0.25: 4.0,
    0.50: 37.5,
    0.75: 336.0,
    0.90: 1443.0,
    0.95: 2452.0,
    0.99: 8814.0,
    1.0: 57778.0,
}


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class Trace:
    path: str
    function_ids: tuple[str, ...]
    triggers: tuple[str, ...] | None
    counts: np.ndarray  # [functions, intervals] int64 invocations per interval
    first_minute: int  # minute of day (0-based) at which interval 0 starts
    interval_minutes: int = 1

    @property
    def num_functions(self) -> int:
        return self.counts.shape[0]

    @property
    def num_intervals(self) -> int:
        return self.counts.shape[1]

    def minute_of_day(self, t: np.ndarray | int) -> np.ndarray:
        """Minute of day at which interval `t` starts."""
        return (self.first_minute + np.asarray(t) * self.interval_minutes) % MINUTES_PER_DAY

    def select(self, rows, ids: list[str] | None = None) -> Trace:
        rows = np.asarray(rows)
        return replace(
            self,
            function_ids=tuple(ids) if ids is not None else tuple(self.function_ids[i] for i in rows),
            triggers=tuple(self.triggers[i] for i in rows) if self.triggers is not None else None,
            counts=self.counts[rows],
        )

    def time_slice(self, start: int, stop: int) -> Trace:
        return replace(self, counts=self.counts[:, start:stop], first_minute=int(self.minute_of_day(start)))

    def aggregate(self, interval_minutes: int) -> Trace:
        """Sum counts over intervals of `interval_minutes` minutes (a trailing partial one is dropped)."""
        if interval_minutes < 1:
            raise ValueError(f"interval_minutes must be >= 1, got {interval_minutes}")
        if interval_minutes == 1:
            return self
        n = self.num_intervals // interval_minutes
        counts = self.counts[:, : n * interval_minutes].reshape(self.num_functions, n, interval_minutes).sum(-1)
        return replace(self, counts=counts, interval_minutes=self.interval_minutes * interval_minutes)


def _minute_columns(path: Path, names: list[str]) -> list[int]:
    """0-based minute of day of each count column; they must be consecutive."""
    minutes = []
    for name in names:
        match = re.fullmatch(r"(?:minute_)?(\d+)", name.strip())
        if match is None:
            raise TraceError(f"{path}: header column {name!r} is neither an id column {ID_COLUMNS} nor a minute")
        minutes.append(int(match[1]) - 1)
    if any(b != a + 1 for a, b in itertools.pairwise(minutes)):
        raise TraceError(f"{path}: minute columns are not consecutive")
    return minutes


def read_trace(path: str | Path) -> Trace:
    """Read one per-minute invocation-count CSV (either header style; see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise TraceError(f"{path}: empty file (no header)")
        header = [h.strip() for h in header]
        if "HashFunction" not in header:
            raise TraceError(f"{path}: missing column 'HashFunction'")
        id_index = {name: header.index(name) for name in ID_COLUMNS if name in header}
        count_index = [i for i, name in enumerate(header) if name not in ID_COLUMNS]
        if not count_index:
            raise TraceError(f"{path}: no per-minute count columns")
        minutes = _minute_columns(path, [header[i] for i in count_index])
        ids, triggers, rows = [], [], []
        for line, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise TraceError(f"{path}: row {line} has {len(row)} cells, the header has {len(header)}")
            try:
                values = np.array([row[i] for i in count_index], dtype=np.float64)
            except ValueError:
                bad = next(i for i in count_index if not _is_number(row[i]))
                raise TraceError(f"{path}: row {line}, column {header[bad]!r}: {row[bad]!r} is not a count") from None
            if not np.isfinite(values).all() or (values < 0).any() or (values != np.round(values)).any():
                bad = next(
                    i for i, v in zip(count_index, values, strict=True) if not np.isfinite(v) or v < 0 or v != round(v)
                )
                raise TraceError(
                    f"{path}: row {line}, column {header[bad]!r}: {row[bad]!r} is not a non-negative whole count"
                )
            ids.append(row[id_index["HashFunction"]].strip())
            if "Trigger" in id_index:
                triggers.append(row[id_index["Trigger"]].strip())
            rows.append(values.astype(np.int64))
    if not rows:
        raise TraceError(f"{path}: no data rows")
    return Trace(
        path=str(path),
        function_ids=tuple(ids),
        triggers=tuple(triggers) if "Trigger" in id_index else None,
        counts=np.stack(rows),
        first_minute=minutes[0] % MINUTES_PER_DAY,
    )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def sample_popularity(
    trace: Trace, n: int, seed: int = 0, reference: dict[float, float] = REFERENCE_DAILY_QUANTILES
) -> Trace:
    """`n` functions whose daily totals follow `reference` (quantile -> daily total): for each of
    `n` random quantiles, the row whose total (scaled to a day) is nearest in log space. Rows may
    repeat; repeated ids get a `#k` suffix so every sampled function is a distinct adapter."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    qs = np.array(sorted(reference))
    totals_ref = np.log(np.array([reference[q] for q in qs]))
    targets = np.interp(rng.random(n), qs, totals_ref)
    per_day = MINUTES_PER_DAY / (trace.num_intervals * trace.interval_minutes)
    totals = np.log(np.maximum(trace.counts.sum(1) * per_day, 0.5))
    order = np.argsort(totals)
    pos = np.clip(np.searchsorted(totals[order], targets), 1, len(order) - 1)
    left, right = order[pos - 1], order[pos]
    rows = np.where(np.abs(totals[left] - targets) <= np.abs(totals[right] - targets), left, right)
    seen: dict[int, int] = {}
    ids = []
    for r in rows:
        k = seen.get(int(r), 0)
        seen[int(r)] = k + 1
        ids.append(trace.function_ids[r] if k == 0 else f"{trace.function_ids[r]}#{k}")
    return trace.select(rows, ids)


def split_functions(trace: Trace, holdout: float, seed: int = 0) -> tuple[Trace, Trace]:
    """(rest, held out) by function: a `holdout` fraction of the functions, chosen at random."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    perm = np.random.default_rng(seed).permutation(trace.num_functions)
    cut = max(1, round(trace.num_functions * holdout))
    return trace.select(np.sort(perm[cut:])), trace.select(np.sort(perm[:cut]))
