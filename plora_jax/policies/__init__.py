"""Adapter-residency policies behind one interface (`base.Policy`), one module each."""

from __future__ import annotations

from ..names import POLICY_NAMES
from .base import Decision, Policy, PoolView
from .histogram import Histogram
from .lookahead import Lookahead
from .lru import Lru
from .oracle import Oracle
from .predictive import EwmaForecaster, Forecaster, Predictive, PredictorUnavailable, make_forecaster
from .reactive import Reactive

POLICIES = {cls.name: cls for cls in (Reactive, Lru, Lookahead, Histogram, Predictive, Oracle)}
assert tuple(POLICIES) == POLICY_NAMES, "plora_jax.names.POLICY_NAMES lists every policy class, in order"


def make_policy(name: str, interval_s: float = 60.0, predictor_checkpoint: str | None = None, **options) -> Policy:
    """A policy by name; `oracle` needs `arrivals=` (the future), which only a benchmark knows.
    `predictive` forecasts with `make_forecaster(predictor_checkpoint)` unless given `forecaster=`."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    if name == "predictive" and "forecaster" not in options:
        options["forecaster"] = make_forecaster(predictor_checkpoint or "", interval_s)
    return POLICIES[name](interval_s=interval_s, **options)


__all__ = [
    "POLICIES",
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
    "make_forecaster",
    "make_policy",
]
