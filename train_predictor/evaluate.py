"""Evaluate forecasters as prefetchers on a trace the model has not seen.

    python -m train_predictor.evaluate --trace CSV [--checkpoint DIR] --budgets 0.1,0.2,0.3,0.4,0.5 \\
        [--json OUT] [--plot OUT.png]

At every interval t each predictor ranks the adapters (one function = one adapter) using only
intervals before t; the top K = budget x adapters count as resident during t. The first quarter
of the trace is history only (warm-up). Reported per budget and predictor:
- `activation_hit_rate`: over (adapter, interval) pairs with at least one request, the fraction
  whose adapter was resident. A miss is one cold start, however many requests follow in it.
- `request_hit_rate`: the same, weighted by the requests.
- `roc_auc`: how well the scores separate active from idle (adapter, interval) pairs.

Predictors: `lstm` (the checkpoint's model, run online from a zero state), `last_value` (the
previous interval's count), `ewma` (alpha 0.3), `lru` (most recent request first), `freq`
(requests over the last hour), `histogram` (ATC'20 hybrid histogram: adapters inside their
pre-warm/keep-alive window first, then by recency) and `oracle` (the interval's own counts: the
upper bound).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from plora_jax.predictor.traces import Trace, read_trace

PREDICTORS = ("lstm", "last_value", "ewma", "lru", "freq", "histogram", "oracle")


def _shifted(counts: np.ndarray) -> np.ndarray:
    """Counts of the previous interval at each t (zeros at t = 0)."""
    return np.concatenate([np.zeros((counts.shape[0], 1), counts.dtype), counts[:, :-1]], axis=1)


def last_value_scores(trace: Trace) -> np.ndarray:
    return _shifted(trace.counts).astype(np.float64)


def ewma_scores(trace: Trace, alpha: float = 0.3) -> np.ndarray:
    previous = _shifted(trace.counts).astype(np.float64)
    scores = np.zeros_like(previous)
    rate = np.zeros(previous.shape[0])
    for t in range(previous.shape[1]):
        rate = alpha * previous[:, t] + (1 - alpha) * rate
        scores[:, t] = rate
    return scores


def lru_scores(trace: Trace) -> np.ndarray:
    """The interval of the most recent request before t (-1: none yet); larger is more recent."""
    active = _shifted(trace.counts) > 0  # active[:, t]: a request in interval t - 1
    index = np.where(active, np.arange(active.shape[1])[None, :] - 1, -1)
    return np.maximum.accumulate(index, axis=1).astype(np.float64)


def freq_scores(trace: Trace, minutes: int = 60) -> np.ndarray:
    """Requests over the last hour (in intervals of the trace) before t."""
    width = max(1, minutes // trace.interval_minutes)
    cum = np.concatenate([np.zeros((trace.num_functions, 1)), np.cumsum(trace.counts, axis=1)], axis=1)
    t = np.arange(trace.num_intervals)
    return cum[:, t] - cum[:, np.maximum(t - width, 0)]


def histogram_scores(trace: Trace) -> np.ndarray:
    """ATC'20 hybrid histogram per adapter (bins of one interval): 1 + recency inside the
    pre-warm/keep-alive window, recency alone outside it (so the budget fills by recency)."""
    from plora_jax.policies import Histogram

    policy = Histogram(interval_s=1.0)
    recency = lru_scores(trace)
    scale = max(1.0, float(trace.num_intervals))
    scores = recency / scale
    names = [str(i) for i in range(trace.num_functions)]
    for t in range(1, trace.num_intervals):
        for i in np.flatnonzero(trace.counts[:, t - 1]):
            policy.observe(names[i], float(t - 1))
        for i, name in enumerate(names):
            last = recency[i, t]
            if last < 0:
                continue
            prewarm, end = policy.window(name)
            idle = t - last
            if prewarm <= idle <= end:
                scores[i, t] += 1.0
    return scores


def oracle_scores(trace: Trace) -> np.ndarray:
    return trace.counts.astype(np.float64)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), by ranks."""
    scores, labels = scores.ravel(), labels.ravel().astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def hit_rates(scores: np.ndarray, counts: np.ndarray, budget: float, start: int) -> dict[str, float]:
    """Hit rates of keeping the top `budget` fraction resident at each interval from `start`."""
    n = counts.shape[0]
    k = max(1, round(budget * n))
    s, c = scores[:, start:], counts[:, start:]
    # rank within each interval; ties broken by a fixed order (row index)
    top = np.argsort(-s, axis=0, kind="stable")[:k]
    resident = np.zeros_like(c, dtype=bool)
    np.put_along_axis(resident, top, True, axis=0)
    active = c > 0
    return {
        "activation_hit_rate": float((resident & active).sum() / max(active.sum(), 1)),
        "request_hit_rate": float((c * resident).sum() / max(c.sum(), 1)),
    }


def evaluate(trace: Trace, budgets, predictor=None, warmup_fraction: float = 0.25, predictors=PREDICTORS) -> dict:
    """{"budgets": {budget: {predictor: {"activation_hit_rate", "request_hit_rate", "roc_auc"}}}}."""
    from plora_jax.predictor.forecaster import score_trace

    makers = {
        "lstm": lambda: score_trace(predictor, trace),
        "last_value": lambda: last_value_scores(trace),
        "ewma": lambda: ewma_scores(trace),
        "lru": lambda: lru_scores(trace),
        "freq": lambda: freq_scores(trace),
        "histogram": lambda: histogram_scores(trace),
        "oracle": lambda: oracle_scores(trace),
    }
    start = int(trace.num_intervals * warmup_fraction)
    labels = trace.counts[:, start:] > 0
    results: dict = {"budgets": {}}
    for name in predictors:
        if name == "lstm" and predictor is None:
            continue
        scores = makers[name]()
        auc = roc_auc(scores[:, start:], labels)
        for budget in budgets:
            entry = hit_rates(scores, trace.counts, budget, start) | {"roc_auc": auc}
            results["budgets"].setdefault(f"{budget:g}", {})[name] = entry
    return results


def cold_ratio(results: dict, budget: str, name: str = "lstm") -> tuple[float, str]:
    """Cold activations of `name` over those of the best baseline (not oracle) at `budget`."""
    entry = results["budgets"][budget]
    baselines = {k: v for k, v in entry.items() if k not in (name, "oracle")}
    best = max(baselines, key=lambda k: baselines[k]["activation_hit_rate"])
    cold = 1 - entry[name]["activation_hit_rate"]
    return cold / max(1e-12, 1 - baselines[best]["activation_hit_rate"]), best


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(results["budgets"], key=float)
    names = list(results["budgets"][budgets[0]])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in names:
        for ax, metric in zip(axes, ("activation_hit_rate", "request_hit_rate"), strict=True):
            ax.plot(
                [float(b) for b in budgets],
                [results["budgets"][b][name][metric] for b in budgets],
                marker="o",
                label=name,
                linewidth=2.5 if name == "lstm" else 1.2,
                linestyle="--" if name == "oracle" else "-",
            )
    for ax, metric in zip(axes, ("activation hit rate", "request hit rate"), strict=True):
        ax.set_xlabel("budget (fraction of adapters resident)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="an invocation-count CSV not used in training")
    parser.add_argument("--checkpoint", help="predictor folder (default: the shipped checkpoint)")
    parser.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--interval-minutes", type=int, default=1)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--plot", help="write hit rates against budget to this PNG")
    args = parser.parse_args(argv)
    from plora_jax.predictor.model import load_predictor

    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets must be comma-separated fractions, got {args.budgets!r}")
    if not all(0 < b <= 1 for b in budgets):
        parser.error(f"--budgets must lie in (0, 1], got {args.budgets!r}")
    trace = read_trace(args.trace).aggregate(args.interval_minutes)
    results = evaluate(trace, budgets, load_predictor(args.checkpoint))
    results["trace"] = Path(args.trace).name
    results["functions"], results["intervals"] = trace.num_functions, trace.num_intervals
    header = f"{'budget':>6} {'predictor':>10} {'act. hit':>9} {'cold':>7} {'req. hit':>9} {'AUC':>6}"
    print(header)
    for budget, entry in results["budgets"].items():
        for name, m in entry.items():
            print(
                f"{budget:>6} {name:>10} {m['activation_hit_rate']:9.4f} {1 - m['activation_hit_rate']:7.4f} "
                f"{m['request_hit_rate']:9.4f} {m['roc_auc']:6.3f}"
            )
        ratio, best = cold_ratio(results, budget)
        print(f"{budget:>6} lstm cold activations / best baseline ({best}): {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
