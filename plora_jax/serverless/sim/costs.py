"""The simulator's cost profile: what a step, an adapter load and an instance start cost.

A request reaches its engine `request_overhead_s` after it arrives (validation, the hand-off
to the loop thread). A step's cost is linear in its `StepShape` (the engine's own description of a step, sizes
padded to the compiled buckets):

    step_base_s                                           every step (the loop's host work)
  + decode_base_s + decode_row_s * rows + decode_context_token_s * context     if it decodes
  + prefill_base_s + prefill_token_s * tokens                                  if it prefills
  + decode_adapter_row_s * adapter rows + prefill_adapter_token_s * adapter tokens
  + transfer_step_s                                  if an adapter transfer is in flight
  + commit_page_s * pages committed into the device pool in its iteration

`fit` takes the coefficients from steps a live engine recorded (`Engine.record_steps`): a
non-negative least-squares fit of the recorded durations, so the profile holds what the engine
spent per step on that machine, host work included. The load cost is `load_base_s` plus the
bytes over `h2d_bytes_per_s` (plus over `disk_bytes_per_s` from disk; 0 means the disk read is
inside the host-to-device rate, as in a calibration without host-only reads to time it). An
adapter only in its store is fetched into the node cache first, over the store link:
`store_latency_s` plus its bytes over `store_bytes_per_s` (`fetch_s`). A live calibration takes
these from the links' measured lines (`metrics.LinkFit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from ...engine.step_log import StepRecord, StepShape

# The fitted coefficients, in the order of `features`.
STEP_TERMS = (
    "step_base_s",
    "decode_base_s",
    "decode_row_s",
    "decode_context_token_s",
    "prefill_base_s",
    "prefill_token_s",
    "decode_adapter_row_s",
    "prefill_adapter_token_s",
    "transfer_step_s",
    "commit_page_s",
)

# A recorded step this many median absolute deviations off the fit (in relative error) is left
# out: a late compile or a long collection pause, not the tail of ordinary steps, which the
# mean cost has to include (a mean TTFT sums them).
OUTLIER_MADS = 20.0


@dataclass(frozen=True)
class Calibration:
    """Costs of one engine on one machine (seconds, bytes)."""

    source: str = "hand"  # where the figures come from (a machine and a command, or "hand")
    step_base_s: float = 0.0  # every step
    decode_base_s: float = 0.02  # a step with a decode launch
    decode_row_s: float = 0.001  # per decode row (padded)
    decode_context_token_s: float = 0.0  # per context token a decode row attends over
    prefill_base_s: float = 0.0  # a step with a prefill launch
    prefill_token_s: float = 0.0005  # per prefilled token (padded)
    decode_adapter_row_s: float = 0.0  # per decode row that runs an adapter
    prefill_adapter_token_s: float = 0.0  # per prefilled token that runs an adapter
    transfer_step_s: float = 0.0  # added to a step while an adapter transfer is in flight (its host share)
    commit_page_s: float = 0.0  # per adapter page committed into the device pool in the step's iteration
    request_overhead_s: float = 0.0  # from a request's arrival until the engine holds it (the caller's hand-off)
    load_base_s: float = 0.01  # fixed cost of one adapter load (placement, commit)
    h2d_bytes_per_s: float = 2e9  # host to device copy
    disk_bytes_per_s: float = 5e8  # disk read into the host cache (0: already counted in h2d_bytes_per_s)
    store_latency_s: float = 0.05  # one fetch from the adapter store into the node cache: its fixed cost
    store_bytes_per_s: float = 1e8  # and its rate
    instance_start_s: float = 20.0  # an instance from zero to warm (params and executables from caches)
    bytes_per_rank: int = 0  # device bytes one rank row of an adapter occupies (all layers, projections)
    kv_bytes_per_token: int = 0  # device bytes of one token's K and V (all layers): what a KV block costs
    fit_steps: int = 0  # recorded steps the step terms were fitted to (0: not fitted)
    fit_outliers: int = 0  # recorded steps left out of the fit (over OUTLIER_MADS off)
    fit_error: float = 0.0  # the fit's mean absolute error over its steps / their mean duration

    def step_s(self, shape: StepShape) -> float:
        """A step's duration."""
        return float(np.dot(features(shape), [getattr(self, name) for name in STEP_TERMS]))

    def load_s(self, nbytes: int, on_host: bool) -> float:
        t = self.load_base_s + nbytes / self.h2d_bytes_per_s
        return t if on_host or self.disk_bytes_per_s <= 0 else t + nbytes / self.disk_bytes_per_s

    def fetch_s(self, nbytes: int) -> float:
        """One adapter's fetch from the store into the node cache."""
        return self.store_latency_s + nbytes / self.store_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


def features(shape: StepShape) -> tuple[float, ...]:
    """The step's values of the `STEP_TERMS` (what each coefficient multiplies)."""
    decodes, prefills = shape.decode_rows > 0, shape.prefill_tokens > 0
    return (
        1.0,
        float(decodes),
        float(shape.decode_rows),
        float(shape.decode_context),
        float(prefills),
        float(shape.prefill_tokens),
        float(shape.adapter_rows),
        float(shape.adapter_tokens),
        float(shape.loading),
        float(shape.committed_pages),
    )


def fit(records: Sequence[StepRecord], base: Calibration, source: str = "") -> Calibration:
    """`base` with its step terms fitted to recorded steps: non-negative least squares, refitted
    without the steps whose relative error is more than `OUTLIER_MADS` median absolute
    deviations off the last fit's (a late compile, a long pause) until that set settles."""
    from scipy.optimize import nnls

    if len(records) < len(STEP_TERMS):
        raise ValueError(f"fit needs at least {len(STEP_TERMS)} recorded steps, got {len(records)}")
    x = np.array([features(r.shape) for r in records])
    y = np.array([r.seconds for r in records])
    scale = np.maximum(x.max(axis=0), 1e-12)  # columns of similar size: nnls converges on them
    keep = np.ones(len(y), bool)
    for _ in range(5):  # refit without the outliers of the last fit, until they stay the same
        coef, _ = nnls(x[keep] / scale, y[keep])
        predicted = (x / scale) @ coef
        residual = (y - predicted) / np.maximum(predicted, 1e-6)  # relative: step times vary in proportion
        mad = np.median(np.abs(residual[keep] - np.median(residual[keep]))) + 1e-6
        again = np.abs(residual - np.median(residual[keep])) <= OUTLIER_MADS * mad
        if (again == keep).all():
            break
        keep = again
    else:
        coef, _ = nnls(x[keep] / scale, y[keep])  # the coefficients of the set reported
    coef = coef / scale
    kept = keep.sum()
    error = float(np.mean(np.abs(y - x @ coef)[keep]) / max(np.mean(y[keep]), 1e-12))
    terms = dict(zip(STEP_TERMS, map(float, coef), strict=True))
    fitted = dict(fit_steps=int(kept), fit_outliers=len(y) - int(kept), fit_error=error)
    return replace(base, **terms, **fitted, source=source or base.source)
