"""The replay's metrics, computed the same way from a live run and from a simulation.

Per request the replay records arrival, first token and finish times, whether it was a cold
start (its adapter was not on the device when it first asked for it) and how long it waited for
its adapter. From those and the run's counters:

- a request's adapter wait: from its first admission attempt until its adapter is on the
  device (0 when it already was); `adapter_wait_mean_s` is its mean over all completed requests;
- cold-start latency, conditional (`cold_start_*_s`): median / mean / p99 of the adapter wait
  over the run's own cold starts. A policy that prefetches well keeps only the cold starts it
  could not foresee, so this figure can rise while users wait less. By the tier the adapter
  came from (`cold_from_{host,disk,store}` count them, `cold_from_{tier}_{median,mean}_s`);
- cold-start latency, paired (`baseline_cold_*_s`, `pair`): median / mean / p99 of the adapter
  wait over the requests that were cold starts in the baseline's run of the same workload
  (`reactive_sync`), whatever they were in this run (0 when the adapter was resident). This
  is the paper's figure and the one the claims print;
- `stall_s` (synchronous loads): the seconds each load held the loop, times the running
  requests it held up; what a synchronous baseline costs the requests that did not ask;
- TTFT mean / p99 over all requests (arrival to first token, queueing included);
- throughput: completed requests and generated tokens per second, from the first arrival to the
  last completion;
- adapter memory utilisation, prefetch precision and recall (the device's, and per tier the
  host's and the disk's): as `plora_jax.metrics` defines them (the one definition the engine
  and the server use too); utilisation is the run's time
  average (byte-seconds), the memory samples once per interval are for the plots only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..names import BASELINE_POLICY


@dataclass(frozen=True)
class RequestRecord:
    arrival: float
    first_token: float | None  # None: the request did not complete
    finished: float | None
    cold: bool
    adapter_wait_s: float
    output_tokens: int
    instance_wait_s: float = 0.0  # waited for its instance to start (serverless)
    submit_lag_s: float = 0.0  # from arrival (or its instance's start) until the engine held it: the caller's hand-off
    request: int = -1  # its index in the workload's requests (pairs the same request across policies)
    tier: str = ""  # the fastest tier holding its adapter when it arrived ("" without an adapter)


@dataclass
class Run:
    """One policy's replay: its metrics, per-request records and memory samples (for plots)."""

    summary: dict
    records: list[RequestRecord]
    memory: list[tuple[float, float]]  # (seconds since the start, adapter memory utilisation)
    steps: list = field(default_factory=list)  # the engines' `StepRecord`s, when recorded (live)


def _pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _latency(prefix: str, values) -> dict:
    return {
        f"{prefix}_median_s": float(np.median(values)) if len(values) else 0.0,
        f"{prefix}_mean_s": float(np.mean(values)) if len(values) else 0.0,
        f"{prefix}_p99_s": _pct(values, 99),
    }


def summarize(records: list[RequestRecord], counters: dict, mem_util: float, extra: dict | None = None) -> dict:
    done = [r for r in records if r.finished is not None]
    ttft = [r.first_token - r.arrival for r in done]
    cold = [r.adapter_wait_s for r in done if r.cold]
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finished for r in done), default=start)
    span = max(end - start, 1e-9)
    cold_starts = counters.get("cold_starts", len(cold))
    counters = {**counters, "cold_starts": cold_starts}
    out = {
        "requests": len(records),
        "completed": len(done),
        "cold_starts": int(cold_starts),
        **_latency("cold_start", cold),
        "adapter_wait_mean_s": float(np.mean([r.adapter_wait_s for r in done])) if done else 0.0,
        "ttft_mean_s": float(np.mean(ttft)) if ttft else 0.0,
        "ttft_p90_s": _pct(ttft, 90),  # goodput's SLO figure (`uncertainty.goodput`)
        "ttft_p99_s": _pct(ttft, 99),
        "throughput_rps": len(done) / span,
        "throughput_tok_s": sum(r.output_tokens for r in done) / span,
        "adapter_mem_util": float(mem_util),
        "prefetch_precision": metrics.prefetch_precision(counters),
        "prefetch_recall": metrics.prefetch_recall(counters),
        "prefetch_issued": int(counters.get("prefetch_issued", 0)),
        "bytes_host_to_device": int(counters.get("bytes_host_to_device", 0)),
        "bytes_disk_to_host": int(counters.get("bytes_disk_to_host", 0)),
        "stall_s": 0.0,
        **metrics.tier_prefetch(counters),
        **{k: int(counters.get(k, 0)) for k in ("disk_prefetch_issued", "bytes_remote_to_disk", "kv_reclaims")},
        # Bytes moved by prefetches that no request used, over every tier.
        "prefetch_wasted_bytes": int(sum(counters.get(f"{p}prefetch_wasted_bytes", 0) for p in metrics.PREFETCH_TIERS)),
    }
    for tier in metrics.TIERS[1:]:
        waits = [r.adapter_wait_s for r in done if r.cold and r.tier == tier]
        latency = _latency(f"cold_from_{tier}", waits)
        out |= {f"cold_from_{tier}": len(waits), **{k: v for k, v in latency.items() if not k.endswith("p99_s")}}
    return out | (extra or {})


def pair(runs: dict[str, Run], baseline: str = BASELINE_POLICY) -> None:
    """Add the paired cold-start latency (`baseline_cold_*_s`, module docstring) to every run's
    summary: the adapter waits, in that run, of the requests cold in `baseline`'s run. Only
    requests completed in both runs count (`baseline_cold_requests` says how many). Without a
    baseline run nothing is added."""
    if baseline not in runs:
        return
    base = runs[baseline].records
    cold_ids = {r.request for r in base if r.cold and r.finished is not None}
    if any(r.request < 0 for r in base):
        raise ValueError("pair: the records do not name their requests (RequestRecord.request)")
    for run in runs.values():
        waits = [r.adapter_wait_s for r in run.records if r.request in cold_ids and r.finished is not None]
        run.summary.update(_latency("baseline_cold", waits), baseline_cold_requests=len(waits))


def claims(policies: dict, ours: str = "predictive", baseline: str = BASELINE_POLICY) -> dict:
    """The paper's four claims as ratios of `ours` against `baseline` (missing: empty)."""
    if ours not in policies or baseline not in policies:
        return {}
    a, b = policies[ours], policies[baseline]
    ratio = lambda x, y: x / y if y else float("nan")
    paired = "baseline_cold_median_s" in a
    median, mean = (
        ("baseline_cold_median_s", "baseline_cold_mean_s") if paired else ("cold_start_median_s", "cold_start_mean_s")
    )
    return {
        "baseline": baseline,
        "cold_start_median_change": ratio(a[median], b[median]) - 1.0,  # paired, once `pair` ran (nan: both 0)
        "cold_start_mean_change": ratio(a[mean], b[mean]) - 1.0,
        "cold_start_median_measure": "paired" if paired else "conditional",
        "ttft_mean_change": ratio(a["ttft_mean_s"], b["ttft_mean_s"]) - 1.0,
        "throughput_ratio": ratio(a["throughput_rps"], b["throughput_rps"]),
        "adapter_mem_util": a["adapter_mem_util"],
        "cold_starts_ratio": ratio(a["cold_starts"], b["cold_starts"]),
    }


def format_claims(c: dict, ours: str = "predictive") -> str:
    if not c:
        return ""
    change = lambda x: "n/a (0 in both)" if x != x else f"{x:+.0%}"  # nan: a 0 / 0 ratio
    return (
        f"{ours} vs {c['baseline']}: median cold-start latency ({c['cold_start_median_measure']}) "
        f"{change(c['cold_start_median_change'])} (paper -68%; mean {change(c['cold_start_mean_change'])}), "
        f"mean TTFT {c['ttft_mean_change']:+.0%} (paper -35%), throughput {c['throughput_ratio']:.2f}x "
        f"(paper 1.52x), adapter memory utilisation {c['adapter_mem_util']:.1%} (paper > 87%)"
    )


COLUMNS = (
    ("cold_starts", "cold", "{:d}"),
    ("cold_start_median_s", "cold p50 s", "{:.3f}"),
    ("cold_start_mean_s", "cold mean s", "{:.3f}"),
    ("cold_start_p99_s", "cold p99 s", "{:.3f}"),
    ("baseline_cold_median_s", "paired p50 s", "{:.3f}"),
    ("baseline_cold_mean_s", "paired mean s", "{:.3f}"),
    ("adapter_wait_mean_s", "wait mean s", "{:.3f}"),
    ("stall_s", "stall s", "{:.1f}"),
    ("ttft_mean_s", "TTFT mean s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("throughput_rps", "req/s", "{:.2f}"),
    ("throughput_tok_s", "tok/s", "{:.1f}"),
    ("adapter_mem_util", "mem util", "{:.1%}"),
    ("prefetch_precision", "pf prec", "{:.2f}"),
    ("prefetch_recall", "pf recall", "{:.2f}"),
    ("bytes_host_to_device", "MB h2d", None),
    ("cold_from_store_median_s", "store cold p50 s", "{:.3f}"),  # cold starts whose adapter was only in its store
    ("disk_prefetch_issued", "store prefetches", "{:d}"),
    ("disk_prefetch_precision", "store pf prec", "{:.2f}"),
    ("disk_prefetch_recall", "store pf recall", "{:.2f}"),
    ("bytes_remote_to_disk", "MB store", None),
    ("prefetch_wasted_bytes", "MB pf wasted", None),
    ("compiles_after_warmup", "compiles", "{:d}"),  # the simulator compiles nothing: always 0
)


def table(policies: dict) -> str:
    """A markdown table, one row per policy."""
    head = "| policy | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    rows = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, m in policies.items():
        cells = []
        for key, _, fmt in COLUMNS:
            if key not in m:  # paired figures need the baseline's run
                cells.append("-")
                continue
            cells.append(f"{m[key] / 2**20:.0f}" if fmt is None else fmt.format(m[key]))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
