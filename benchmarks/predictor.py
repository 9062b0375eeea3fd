"""Online forecaster latency: `python -m benchmarks.predictor [--adapters N] [--json OUT]`.

The runtime calls the forecaster once per interval: `update(counts)` advances the LSTM one step
for every adapter (one jitted call over a power-of-two bucket of rows) and `predict()` returns
the probabilities. This measures that pair over `--intervals` intervals of Azure-like counts for
`--adapters` adapters, after a warm-up interval that compiles, with the EWMA forecaster (the
fallback) timed the same way in the same run. Goal (issue 6): <= 5 ms for 1,000 adapters.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .common import machine, write_json


def time_forecaster(forecaster, names: list[str], counts: np.ndarray) -> list[float]:
    forecaster.update(dict(zip(names, counts[:, 0].tolist(), strict=True)))  # compiles
    forecaster.predict()
    times = []
    for t in range(1, counts.shape[1]):
        batch = {n: int(c) for n, c in zip(names, counts[:, t], strict=True) if c}  # absent: zero requests
        start = time.perf_counter()
        forecaster.update(batch)
        forecaster.predict()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--intervals", type=int, default=60)
    parser.add_argument("--checkpoint", help="predictor folder (default: the shipped checkpoint)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    from plora_jax.policies import EwmaForecaster
    from plora_jax.predictor.forecaster import LstmForecaster

    rng = np.random.default_rng(0)
    names = [f"adapter-{i}" for i in range(args.adapters)]
    rates = np.exp(rng.uniform(-6, 3, args.adapters))  # per-interval rates over many orders of magnitude
    counts = rng.poisson(rates[:, None], (args.adapters, args.intervals + 1))
    lstm = np.array(time_forecaster(LstmForecaster(args.checkpoint), names, counts)) * 1e3
    ewma = np.array(time_forecaster(EwmaForecaster(), names, counts)) * 1e3
    payload = {
        "machine": machine(),
        "adapters": args.adapters,
        "intervals": args.intervals,
        "lstm_ms_median": float(np.median(lstm)),
        "lstm_ms_p99": float(np.percentile(lstm, 99)),
        "ewma_ms_median": float(np.median(ewma)),
        "lstm_over_ewma": float(np.median(lstm) / np.median(ewma)),
        "goal_met": float(np.median(lstm)) <= 5.0,
    }
    write_json(args.json, payload)
    print(
        f"machine: {payload['machine']}\n"
        f"one interval over {args.adapters} adapters: LSTM {payload['lstm_ms_median']:.2f} ms median "
        f"(p99 {payload['lstm_ms_p99']:.2f}), EWMA {payload['ewma_ms_median']:.2f} ms; "
        f"ratio {payload['lstm_over_ewma']:.1f}x; goal <= 5 ms {'met' if payload['goal_met'] else 'NOT met'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
