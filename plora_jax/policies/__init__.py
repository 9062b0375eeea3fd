"""Adapter-residency policies behind one interface (`base.Policy`), one module each."""

from __future__ import annotations

from collections.abc import Callable

from ..names import BASELINE_POLICY, ORACLES, POLICY_NAMES
from .base import Decision, Policy, PoolView
from .histogram import Histogram
from .lookahead import Lookahead
from .lru import Lru
from .oracle import CausalOracle, Oracle
from .predictive import EwmaForecaster, Forecaster, Predictive, PredictorUnavailable, make_forecaster
from .reactive import Reactive
from .retention import RETENTION_INTERVALS
from .slora import Slora, SloraPrefetch

POLICIES = {
    cls.name: cls
    for cls in (Reactive, Lru, Lookahead, Histogram, Predictive, Slora, SloraPrefetch, Oracle, CausalOracle)
}
assert tuple(POLICIES) == POLICY_NAMES, "plora_jax.names.POLICY_NAMES lists every policy class, in order"


def make_policy(
    name: str,
    interval_s: float = 60.0,
    predictor_checkpoint: str | None = None,
    retention_intervals: float = RETENTION_INTERVALS,
    **options,
) -> Policy:
    """A policy by name; the oracles need `arrivals=` (the future), which only a benchmark knows.
    `predictive` forecasts with `make_forecaster(predictor_checkpoint)` unless given
    `forecaster=`, and keeps returning adapters over `retention_intervals` (the others ignore it)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    if name == "predictive":
        options.setdefault("retention_intervals", retention_intervals)
        if "forecaster" not in options:
            options["forecaster"] = make_forecaster(predictor_checkpoint or "", interval_s)
    return POLICIES[name](interval_s=interval_s, **options)


def replay_policy(
    name: str,
    interval_s: float,
    arrivals: list[tuple[float, str]],
    minute_of_day: Callable[[], float],
    predictor_checkpoint: str = "",
    retention_intervals: float = RETENTION_INTERVALS,
) -> Policy:
    """A trace replay's policy `name`. `reactive_sync` is `reactive` with the engine's loads
    synchronous (`adapter_loads`). The oracles are given the replay's `arrivals`; `predictive`
    forecasts with the LSTM (or "ewma"), its time of day read from `minute_of_day()` (the
    trace's clock, which a replay may compress), keeping returning adapters over
    `retention_intervals`."""
    base = "reactive" if name == BASELINE_POLICY else name
    if base in ORACLES:
        return make_policy(base, interval_s, arrivals=arrivals)
    if base == "predictive":
        if predictor_checkpoint == "ewma":
            forecaster = EwmaForecaster()
        else:
            from ..predictor.forecaster import LstmForecaster  # flax and orbax: only when used

            forecaster = LstmForecaster(predictor_checkpoint or None, interval_minutes=1.0, minute_of_day=minute_of_day)
        return make_policy("predictive", interval_s, forecaster=forecaster, retention_intervals=retention_intervals)
    return make_policy(base, interval_s)


def adapter_loads(name: str) -> str:
    """How a replay's engine loads adapters under policy `name`: "sync" for `reactive_sync` and
    the policies whose `sync_loads` is set (S-LoRA's), else "async"."""
    if name == BASELINE_POLICY:
        return "sync"
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return "sync" if POLICIES[name].sync_loads else "async"


__all__ = [
    "POLICIES",
    "CausalOracle",
    "Decision",
    "EwmaForecaster",
    "Forecaster",
    "Histogram",
    "Lookahead",
    "Lru",
    "Oracle",
    "Policy",
    "PoolView",
    "Predictive",
    "PredictorUnavailable",
    "Reactive",
    "Slora",
    "SloraPrefetch",
    "adapter_loads",
    "make_forecaster",
    "make_policy",
    "replay_policy",
]
