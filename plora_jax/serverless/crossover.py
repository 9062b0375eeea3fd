"""The crossover: how much hiding adapter loads can gain, as a function of what a load costs.

Every policy is compared with S-LoRA's synchronous loads (`reactive_sync`): a load of b bytes
over a link of B bytes/s with a fixed cost L holds the whole loop for t_sync = L + b / B. With
p_c loads per request that the baseline's steps wait on (its synchronous waits: a cold request
whose adapter is already loading for another waits for that load, not one of its own) and a
capacity of C requests/s when nothing stalls, the baseline spends about C x p_c x t_sync of
every second stalled, so a policy that hides every load can gain at most

    G = 1 + C x p_c x t_sync

in capacity (`analytic_gain`). A copy over PCIe (milliseconds) keeps G near 1 whatever a
forecast does; a fetch from object storage (hundreds of milliseconds) gives it room.

`run_point` measures one link (bandwidth, latency) on one workload. Capacity is requests served
per second the engine had work (`served_per_busy_s`), offered `saturation` x the profile's
capacity (the trace is bursty: its quiet minutes leave the engine idle, and they do not count).
C is the baseline's capacity with loads that cost nothing (a reference run); p_c
and t_sync are the baseline's at this link. `bound_gain`, C over the baseline's capacity at
this link, is what hiding every load would gain, measured; the analytic G predicts it. Each
policy's capacity ratio and its mean-TTFT change at a stable load (`load` x C, on the same
requests for every policy) are against the baseline's.

The link is the whole load path: adapters start in host memory (`SimConfig.adapters_on_host`,
as S-LoRA keeps them), a load costs `latency + bytes / bandwidth` (`Calibration.load_base_s`
and `h2d_bytes_per_s`) and nothing else, one load at a time on the link. An asynchronous
policy's demand load is waited for only where it costs less than a decode step
(`EngineConfig.wait_host_copies`, meant for copies of milliseconds): else it would hold the
loop as the baseline does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..buckets import cdiv
from ..names import BASELINE_POLICY
from .sim import Calibration, SimConfig, simulate
from .sweep import capacity_rps, scale_to_load
from .workload import Workload, WorkloadConfig, generate

HOLDS_EVERY_ADAPTER_MB = float(2**20)  # a host cache no workload here outgrows (sizes only: nothing is allocated)


@dataclass(frozen=True)
class Link:
    """One load path: its rate and the fixed cost of each load."""

    bytes_per_s: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def analytic_gain(capacity_rps: float, cold_per_request: float, t_sync_s: float) -> float:
    """G = 1 + C x p_c x t_sync (the module's docstring)."""
    return 1.0 + capacity_rps * cold_per_request * t_sync_s


def link_calibration(profile: Calibration, link: Link) -> Calibration:
    """`profile` with every load costing what `link` charges (no separate disk read)."""
    return replace(profile, h2d_bytes_per_s=link.bytes_per_s, load_base_s=link.latency_s, disk_bytes_per_s=0.0)


def mean_load_bytes(workload: Workload, bytes_per_rank: int, page_rows: int) -> float:
    """Device bytes of the adapter of the average measured request (whole pages)."""
    requests = workload.measured_requests
    pages = [cdiv(workload.ranks[r.adapter], page_rows) for r in requests]
    return sum(pages) * page_rows * bytes_per_rank / max(1, len(pages))


def run_point(
    workload_config: WorkloadConfig,
    link: Link,
    profile: Calibration,
    config: SimConfig,
    policies: Sequence[str],
    load: float = 0.9,
    saturation: float = 1.5,
    predictor_checkpoint: str = "",
) -> dict:
    """One link's figures (the module's docstring): C, p_c, t_sync, the analytic G and the
    measured bound, and per policy (the baseline included, at 1.0) its capacity ratio and
    mean-TTFT change against the baseline; the summaries of every run under "runs"."""
    base = generate(workload_config)
    t_sync = link.seconds(mean_load_bytes(base, profile.bytes_per_rank, config.engine.page_rows))
    # An asynchronous engine waits for a copy only where it costs less than the step it would miss.
    wait = t_sync <= profile.decode_base_s + profile.step_base_s
    engine = replace(config.engine, wait_host_copies=wait, host_cache_mb=HOLDS_EVERY_ADAPTER_MB)
    config = replace(config, adapters_on_host=True, engine=engine)
    offered = capacity_rps(profile, base, config.engine)  # for the saturated runs' arrival rate only
    _, saturated = scale_to_load(workload_config, base, saturation, offered, config.instances)
    run = lambda workload, policy, cal: simulate(workload, policy, config, cal, predictor_checkpoint).summary
    free = run(saturated, BASELINE_POLICY, link_calibration(profile, Link(float("inf"), 0.0)))
    capacity = free["served_per_busy_s"]
    cal = link_calibration(profile, link)
    policies = list(dict.fromkeys((BASELINE_POLICY, *policies)))
    runs = {"saturated": {p: run(saturated, p, cal) for p in policies}}
    _, stable = scale_to_load(workload_config, base, load, capacity, config.instances)
    runs["stable"] = {p: run(stable, p, cal) for p in policies}
    baseline = runs["saturated"][BASELINE_POLICY]
    # The loads the baseline's steps waited on, per request: a cold start whose adapter was
    # already loading for another request waits for that load, not a load of its own.
    waits_per_request = baseline["sync_waits"] / max(1, baseline["requests"])
    gains = {
        p: {
            "capacity_ratio": runs["saturated"][p]["served_per_busy_s"] / baseline["served_per_busy_s"],
            "ttft_mean_change": runs["stable"][p]["ttft_mean_s"] / runs["stable"][BASELINE_POLICY]["ttft_mean_s"] - 1,
        }
        for p in policies
    }
    return {
        "link": {"bytes_per_s": link.bytes_per_s, "latency_s": link.latency_s},
        "capacity_rps": capacity,
        "cold_per_request": baseline["cold_starts"] / max(1, baseline["requests"]),
        "waits_per_request": waits_per_request,
        "t_sync_s": t_sync,
        "analytic_gain": analytic_gain(capacity, waits_per_request, t_sync),
        "bound_gain": capacity / baseline["served_per_busy_s"],
        "gains": gains,
        "runs": runs | {"free": free},
    }
