"""The crossover: how much hiding adapter loads can gain, as a function of what a load costs.

Every policy is compared with S-LoRA's synchronous loads (`reactive_sync`): a load of b bytes
over a link of B bytes/s with a fixed cost L holds the whole loop for t_sync = L + b / B. With
p_c cold starts per request in the baseline and a capacity of C requests/s when nothing stalls,
the baseline spends about C x p_c x t_sync of every second stalled, so a policy that hides every
load can gain at most

    G = 1 + C x p_c x t_sync

in capacity (`analytic_gain`). A copy over PCIe (milliseconds) keeps G near 1 whatever a
forecast does; a fetch from object storage (hundreds of milliseconds) gives it room.

`run_point` measures one link (bandwidth, latency) on one workload: each policy's capacity (its
throughput when offered `saturation` x C, so it always has work) and its mean TTFT at a stable
load (`load` x C), both against the baseline's on the same requests, with the analytic G from
the baseline's own p_c and t_sync beside them. The link is the whole load path: adapters start
in host memory (`SimConfig.adapters_on_host`, as S-LoRA keeps them), and a load costs
`latency + bytes / bandwidth` (`Calibration.load_base_s` and `h2d_bytes_per_s`) and nothing
else. C is `sweep.capacity_rps` of the profile: full batches, no loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..buckets import cdiv
from ..names import BASELINE_POLICY
from .sim import Calibration, SimConfig, simulate
from .sweep import capacity_rps, scale_to_load
from .workload import Workload, WorkloadConfig, generate


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
    saturation: float = 2.0,
    predictor_checkpoint: str = "",
) -> dict:
    """One link's figures (the module's docstring): the analytic G and its terms, and per policy
    (the baseline included, at 1.0) its capacity ratio and mean-TTFT change against the
    baseline; the summaries of every run under "runs"."""
    cal = link_calibration(profile, link)
    config = replace(config, adapters_on_host=True)
    base = generate(workload_config)
    capacity = capacity_rps(cal, base, config.engine)
    runs: dict[str, dict[str, dict]] = {}
    for label, x in (("saturated", saturation), ("stable", load)):
        _, workload = scale_to_load(workload_config, base, x, capacity, config.instances)
        runs[label] = {
            p: simulate(workload, p, config, cal, predictor_checkpoint).summary
            for p in dict.fromkeys((BASELINE_POLICY, *policies))
        }
    sat, stable = runs["saturated"], runs["stable"]
    baseline = sat[BASELINE_POLICY]
    cold_per_request = baseline["cold_starts"] / max(1, baseline["requests"])
    t_sync = link.seconds(mean_load_bytes(base, profile.bytes_per_rank, config.engine.page_rows))
    gains = {
        p: {
            "capacity_ratio": sat[p]["throughput_rps"] / baseline["throughput_rps"],
            "ttft_mean_change": stable[p]["ttft_mean_s"] / stable[BASELINE_POLICY]["ttft_mean_s"] - 1.0,
        }
        for p in sat
    }
    return {
        "link": {"bytes_per_s": link.bytes_per_s, "latency_s": link.latency_s},
        "capacity_rps": capacity,
        "cold_per_request": cold_per_request,
        "t_sync_s": t_sync,
        "analytic_gain": analytic_gain(capacity, cold_per_request, t_sync),
        "gains": gains,
        "runs": runs,
    }
