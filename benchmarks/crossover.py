"""The crossover: predictive's and the oracle's gain over S-LoRA's synchronous loads against the
load cost, beside the analytic bound G = 1 + C x p_c x t_sync (`plora_jax.serverless.crossover`).

    python -m benchmarks.crossover --profile a100-llama2-7b --json OUT --plot OUT.png

For every link in `--bandwidths-gb-s` x `--latencies-ms`, every rank mix in `--rank-mixes` and
every profile in `--profile` (comma-separated), the simulator replays one trace workload under
`reactive_sync` and each of `--policies`: offered `--saturation` x capacity for the capacity
ratio, and `--load` x capacity for the mean TTFT. Prints one table per profile and rank mix;
`--json` writes `{"points": [{"profile", "ranks", "link", "analytic_gain", "gains", ...}]}`.
With `--seeds N` every point is replayed on N workloads (seeds `--seed` on) and each figure is
their mean with its 95% interval under "ci95". `--plot` draws each policy's capacity ratio
against C x p_c x t_sync with the line G (p_c: the baseline's synchronous waits per request),
and the storage tiers of the profile (its PCIe copy, an NVMe read, an object-store fetch)
marked on the axis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from benchmarks.common import config_and_workload, machine, write_json


@dataclass(frozen=True)
class CrossoverConfig:
    profile: str = "a100-llama2-7b"  # comma-separated cost profiles on paper (plora_jax.serverless.sim.profiles)
    policies: str = "predictive,oracle"  # against reactive_sync, comma-separated
    bandwidths_gb_s: str = "50,25,10,3.5,1,0.3,0.1"  # load-path bandwidths, comma-separated
    latencies_ms: str = "1,20,100"  # fixed cost of one load, comma-separated
    rank_mixes: str = "8-16;8-64;64-128"  # ';'-separated mixes, each 'lo-hi' (powers of two) or 'a,b,c'
    load: float = 0.9  # offered load (x capacity) for the mean TTFT
    saturation: float = 1.5  # offered load for the capacity ratio (served per busy second)
    pool_budget: float = 0.3  # device pool as a share of the adapters' pages
    max_num_seqs: int = 16
    predictor_checkpoint: str = ""  # predictive's forecaster ("": the shipped LSTM; "ewma")
    seeds: int = 1  # workloads per point (seed, seed + 1, ...): figures are their means, with 95% intervals
    json: str = ""
    plot: str = ""


def rank_mix(text: str) -> tuple[int, ...]:
    """'8-64' -> (8, 16, 32, 64); '8,12,16' -> (8, 12, 16)."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        ranks, r = [], lo
        while r <= hi:
            ranks.append(r)
            r *= 2
        return tuple(ranks)
    return tuple(int(x) for x in text.split(","))


def sim_config(cfg: CrossoverConfig, profile: str, wcfg):
    """Every instance's settings: the profile's KV cache, a pool of `pool_budget` x the pages of
    the workload's adapters."""
    from plora_jax.config import EngineConfig
    from plora_jax.serverless.sim import SimConfig, profiles
    from plora_jax.serverless.sweep import pool_for_budget
    from plora_jax.serverless.workload import generate

    ranks = wcfg.ranks
    pages, slots = pool_for_budget(list(generate(wcfg).ranks.values()), cfg.pool_budget, 8)
    engine = EngineConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_loras=slots,
        lora_pool_pages=pages,
        page_rows=8,
        max_lora_rank=max(ranks),
        max_model_len=4096,
        num_kv_blocks=profiles.named(profile)[1],
        policy="reactive",
    )
    return SimConfig(engine=engine)


def storage_marks(profile, mean_rank: float) -> dict[str, float]:
    """Seconds one adapter of `mean_rank` takes to load from each storage tier (the plot's marks)."""
    from plora_jax.serverless.sim.profiles import NVME_BYTES_PER_S

    nbytes = mean_rank * profile.bytes_per_rank
    return {
        "host (PCIe)": profile.load_base_s + nbytes / profile.h2d_bytes_per_s,
        "NVMe": profile.load_base_s + nbytes / NVME_BYTES_PER_S,
        "object store": profile.store_latency_s + nbytes / profile.store_bytes_per_s,
    }


def run(cfg: CrossoverConfig, wcfg) -> dict:
    from plora_jax.serverless import crossover
    from plora_jax.serverless.sim import profiles

    policies = [p for p in cfg.policies.split(",") if p]
    points = []
    print(f"machine: {machine()}", flush=True)
    for name in cfg.profile.split(","):
        for mix_text in cfg.rank_mixes.split(";"):
            ranks = rank_mix(mix_text)
            w = replace(wcfg, ranks=ranks)
            profile = profiles.named(name, mean_rank=sum(ranks) / len(ranks))[0]
            config = sim_config(cfg, name, w)
            rows = []
            for gb in (float(x) for x in cfg.bandwidths_gb_s.split(",")):
                for ms in (float(x) for x in cfg.latencies_ms.split(",")):
                    start = time.perf_counter()
                    link = crossover.Link(gb * 1e9, ms / 1e3)
                    args = (link, profile, config, policies, cfg.load, cfg.saturation, cfg.predictor_checkpoint)
                    point = combine([crossover.run_point(replace(w, seed=w.seed + i), *args) for i in range(cfg.seeds)])
                    point |= {"profile": name, "ranks": list(ranks)}
                    points.append(point)
                    cells = " | ".join(
                        f"{point['gains'][p]['capacity_ratio']:.3f}x / {point['gains'][p]['ttft_mean_change']:+.0%}"
                        for p in policies
                    )
                    rows.append(
                        f"| {gb:g} | {ms:g} | {point['t_sync_s'] * 1e3:.1f} | {point['cold_per_request']:.3f} | "
                        f"{point['waits_per_request']:.4f} | {point['analytic_gain']:.3f} | "
                        f"{point['bound_gain']:.3f} | {cells} |"
                    )
                    print(f"  {name} ranks {mix_text} {gb:g} GB/s {ms:g} ms: {time.perf_counter() - start:.1f} s")
            head = " | ".join(f"{p} capacity / TTFT" for p in policies)
            print(f"\n{name}, ranks {ranks}, load {cfg.load} for TTFT, {cfg.saturation} for capacity:")
            print(f"| GB/s | latency ms | t_sync ms | cold / request | waits / request | G | bound | {head} |")
            print("|" + " --- |" * (7 + len(policies)))
            print("\n".join(rows), flush=True)
    payload = {"machine": machine(), "config": {"crossover": vars(cfg), "workload": vars(wcfg)}, "points": points}
    write_json(cfg.json, payload)
    if cfg.plot:
        plot(points, policies, cfg.plot)
    return payload


FIGURES = ("capacity_rps", "cold_per_request", "waits_per_request", "t_sync_s", "analytic_gain", "bound_gain")


def combine(seeds: list[dict]) -> dict:
    """One point from its per-seed runs: every figure the mean over seeds, and under "ci95" each
    with its 95% interval (`plora_jax.serverless.uncertainty.interval`; per-seed ratios, paired
    on each seed's requests). The first seed's run summaries are kept under "runs"."""
    from plora_jax.serverless.uncertainty import interval

    first = seeds[0]
    out = {"link": first["link"], "seeds": len(seeds), "runs": first["runs"], "ci95": {}, "gains": {}}
    for key in FIGURES:
        iv = interval([s[key] for s in seeds])
        out[key], out["ci95"][key] = iv["value"], iv["ci95"]
    for policy in first["gains"]:
        out["gains"][policy] = {}
        for key in ("capacity_ratio", "ttft_mean_change"):
            iv = interval([s["gains"][policy][key] for s in seeds])
            out["gains"][policy][key] = iv["value"]
            out["ci95"][f"{policy}.{key}"] = iv["ci95"]
    return out


def plot(points: list[dict], policies: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from plora_jax.serverless.sim import profiles

    names = sorted({p["profile"] for p in points})
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [p for p in points if p["profile"] == name]
        x = np.array([p["capacity_rps"] * p["waits_per_request"] * p["t_sync_s"] for p in mine])
        for policy in policies:
            ax.scatter(x, [p["gains"][policy]["capacity_ratio"] for p in mine], label=policy, s=14)
        line = np.linspace(0, max(x.max(), 1e-3), 50)
        ax.plot(line, 1 + line, "k--", label="G = 1 + C p_c t_sync")
        ax.set(xlabel="C x waits per request x t_sync", ylabel="capacity / reactive_sync's", title=name)
        profile = profiles.named(name)[0]
        p_c, c = np.mean([p["waits_per_request"] for p in mine]), np.mean([p["capacity_rps"] for p in mine])
        ranks = [r for p in mine for r in p["ranks"]]
        for label, seconds in storage_marks(profile, sum(ranks) / len(ranks)).items():
            ax.axvline(c * p_c * seconds, color="grey", lw=0.8)
            ax.text(c * p_c * seconds, ax.get_ylim()[1], label, rotation=90, va="top", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    run(*config_and_workload(CrossoverConfig, __doc__, argv, exclude=("ranks",)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
