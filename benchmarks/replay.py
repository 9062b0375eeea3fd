"""Azure-trace replay: every residency policy on the same requests, live or simulated, per
layout, at every point of a grid of pool budgets and loads.

    python -m benchmarks.replay --mode live --adapters 24 --minutes 6 --seconds-per-minute 15 --json OUT --plot OUT.png
    python -m benchmarks.replay --mode sim --adapters 150 --minutes 120 --pool-budget 0.1,0.3,0.5 --load 0.5,1,1.2
    python -m benchmarks.replay --mode sim --profile a100-llama2-7b --json OUT

One workload (`plora_jax.serverless.workload`) is generated from the traces; each policy in
`--policies` then replays it, on fresh engines (`live`) or in the simulator (`sim`), once per
layout in `--layout` and per point: the device pool is `--pool-budget` x the pages of all the
workload's adapters (unless `--lora-pool-pages` is given), and with `--load` the trace's time
is stretched or compressed so that requests arrive at X x one instance's capacity
(`plora_jax.serverless.sweep`). `reactive_sync` is `reactive` with synchronous adapter loads:
S-LoRA as released, the baseline of the paper's claims and of the paired cold-start latency.
Prints one table per layout and point and the claims as ratios of predictive against
reactive_sync; `--json` writes `{"points": [{"point": ..., "layouts": {layout: {"policies":
..., "claims": ...}}}], "config": ..., "calibration": ...}` with the first point's
`layouts` (and, with one layout, its `policies`) also at the top level; `--plot` the TTFT CDF,
cumulative cold starts and memory utilisation over time per policy at the first point, and
with several points `*_sweep.png`: cold starts and paired cold-start latency against the
budget, TTFT and throughput against the load.

A live run measures the cost profile the simulator uses (step terms fitted to the steps the
engines recorded, load and instance start costs; `plora_jax.serverless.live.calibrate`) and
writes it into its JSON; `--calibration` reads it back for `sim` (from a replay JSON or a bare
calibration JSON), and `--profile` replaces it with a GPU's on paper
(`plora_jax.serverless.sim.profiles`). With `--min-instances` below `--instances`, the others
start on demand and stop after `--keep-alive-s` (scale to zero with 0); the cost profile needs
a warm engine. `--warmup-minutes N` (sim) replays the N trace minutes before `--start-minute`
first and measures only the minutes after them (`plora_jax.serverless.workload`): steady state,
with a warm pool and forecasters that have history, rather than a service's first minutes.
`--adapter-store host` (sim) starts every adapter in host memory, as S-LoRA keeps them.
`--adapter-store s3` puts the adapters in an object store: live, moto's S3 server on 127.0.0.1
behind a link of `--store-latency-ms` and `--store-mb-s` (the engines register them from
there); in both modes every policy starts with empty node caches, so each adapter's first use
fetches it over that link (simulated: at the calibration's measured store link, unless the two
flags are given) unless a policy fetched it ahead into the node cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import config_and_workload, machine, write_json
from plora_jax.names import LORA_LAYOUTS, REPLAY_POLICIES
from plora_jax.policies.retention import RETENTION_INTERVALS

ALL_POLICIES = ",".join(REPLAY_POLICIES)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ReplayConfig:
    mode: str = "sim"  # live (real engines on this machine) | sim (the calibrated simulator)
    policies: str = ALL_POLICIES  # comma-separated, all on the same requests
    layout: str = "paged,contiguous"  # comma-separated adapter memory layouts
    instances: int = 1  # most engine instances at once
    min_instances: int = 1  # instances kept warm; below `instances`, the rest start on demand (0: scale to zero)
    keep_alive_s: float = 600.0  # an idle instance above min_instances stops after this long
    model: str = "llama"  # live: model name or path; "tiny": a tiny random model (tests)
    calibration: str = ""  # sim: replay or calibration JSON ("": the committed live CPU run)
    predictor_checkpoint: str = ""  # predictive's forecaster ("": the shipped LSTM; "ewma")
    max_num_seqs: int = 16  # decode rows per instance
    pool_budget: str = "0.3"  # comma-separated: device pools of F x the adapters' pages (plora_jax.serverless.sweep)
    load: str = ""  # comma-separated: arrival rate X x one instance's capacity ("": the trace's own time compression)
    max_loras: int = 0  # adapter slots per instance (0: as many as the pool's pages could hold)
    lora_pool_pages: int = 0  # adapter pages per instance, page 0 reserved (0: from pool_budget)
    profile: str = ""  # a cost profile on paper in place of a calibration: a100-llama2-7b | h100-llama3-8b
    page_rows: int = 8
    max_lora_rank: int = 64
    host_cache_mb: float = 4096.0
    # "separate": the adapter pool is memory beside a full KV cache | "unified": adapter pages are
    # paid in KV blocks (S-LoRA's one pool; the pool budget then only caps the page table). The
    # simulator needs a profile or a calibration with kv_bytes_per_token for it.
    adapter_memory: str = "separate"
    retention_intervals: float = RETENTION_INTERVALS  # predictive's horizon for returning adapters (0: forecast alone)
    adapter_dir: str = ""  # live: folder for the random adapters ("": a temporary folder)
    # Where adapters are at the start (the storage regime): "" (local folders on the node's disk) |
    # "host" (sim: every adapter in host memory, as S-LoRA keeps them) | "s3" (an object store:
    # live, moto's S3 server on 127.0.0.1 behind a throttled link; sim, the store link)
    adapter_store: str = ""
    # The store link: first-byte latency of each response and bytes/s shared by every fetch. Live:
    # the proxy's (0: 50 ms, 100 MB/s). Sim: 0 keeps the calibration's (measured by a live s3 replay).
    store_latency_ms: float = 0.0
    store_mb_s: float = 0.0
    compare: str = ""  # sim: a live replay JSON of the same workload; prints live/sim ratios
    json: str = ""  # write the results here
    plot: str = ""  # write the plots here (PNG)


DEFAULT_CALIBRATION = Path(__file__).parent / "results" / "replay_live_hc_cpu.json"  # its "calibration" block


def load_calibration(path: str):
    from plora_jax.serverless.sim import Calibration

    path = Path(path) if path else DEFAULT_CALIBRATION
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--calibration {path}: cannot read ({e})") from None
    block = payload.get("calibration", payload)
    names = {f.name for f in dataclasses.fields(Calibration)}
    unknown = set(block) - names
    if unknown:
        raise SystemExit(f"--calibration {path}: unknown field(s) {sorted(unknown)}")
    return Calibration(**block)


@dataclass(frozen=True)
class Point:
    """One operating point of the sweep: its pool and its workload."""

    pool_budget: float | None  # None: --lora-pool-pages given
    load: float | None  # None: the trace's own time compression
    lora_pool_pages: int
    max_loras: int
    workload_config: object  # WorkloadConfig
    workload: object  # Workload

    def describe(self) -> dict:
        return {
            "pool_budget": self.pool_budget,
            "load": self.load,
            "lora_pool_pages": self.lora_pool_pages,
            "max_loras": self.max_loras,
            "seconds_per_minute": self.workload_config.seconds_per_minute,
            "requests": len(self.workload.requests),
            "warmup_minutes": self.workload_config.warmup_minutes,
            "measured_requests": len(self.workload.measured_requests),
        }


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: comma-separated numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise SystemExit(f"--{name}: every value must be > 0, got {text!r}")
    return values


def points(cfg: ReplayConfig, wcfg, calibration) -> list[Point]:
    """The sweep's grid, budgets x loads, every point on the same requests (module docstring of
    `plora_jax.serverless.sweep`). Capacity for `--load` comes from `calibration`."""
    from plora_jax.config import EngineConfig
    from plora_jax.serverless import sweep
    from plora_jax.serverless.workload import generate

    base = generate(wcfg)
    loads = _floats(cfg.load, "load") or [None]
    budgets = [None] if cfg.lora_pool_pages else _floats(cfg.pool_budget, "pool-budget")
    if not budgets:
        raise SystemExit("--pool-budget: give at least one fraction (or --lora-pool-pages)")
    ranks = list(base.ranks.values())
    out = []
    for load in loads:
        wc, workload = wcfg, base
        if load is not None:
            probe = EngineConfig(**engine_settings(cfg, "paged", (2, 1)))
            wc, workload = sweep.scale_to_load(wcfg, base, load, sweep.capacity_rps(calibration, base, probe))
        for budget in budgets:
            if budget is None:
                pages = cfg.lora_pool_pages
                _, slots = sweep.pool_for_budget(
                    ranks, (pages - 1) / sweep.adapter_pages(ranks, cfg.page_rows), cfg.page_rows
                )
            else:
                pages, slots = sweep.pool_for_budget(ranks, budget, cfg.page_rows)
            out.append(Point(budget, load, pages, cfg.max_loras or slots, wc, workload))
    return out


def engine_settings(cfg: ReplayConfig, layout: str, pool: tuple[int, int]) -> dict:
    """The `EngineConfig` fields of every instance, live and simulated alike (one source, so a
    simulation runs the settings of the live run it is compared with); `pool` is (pages, slots)."""
    options = dict(
        max_num_seqs=cfg.max_num_seqs,
        max_loras=pool[1],
        lora_pool_pages=pool[0],
        page_rows=cfg.page_rows,
        max_lora_rank=cfg.max_lora_rank,
        host_cache_mb=cfg.host_cache_mb,
        layout=layout,
        adapter_memory=cfg.adapter_memory,
        retention_intervals=cfg.retention_intervals,
        policy="reactive",  # the replay sets each policy itself
        max_model_len=1024,
    )
    if cfg.model == "tiny":  # few buckets: the whole warm-up compiles in seconds
        options |= dict(max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=32, max_prefill_seqs=2)
    if cfg.profile:  # the GPU's KV cache, and the context of the model it is drawn for
        from plora_jax.serverless.sim import profiles

        options |= dict(max_model_len=4096, num_kv_blocks=profiles.named(cfg.profile)[1])
    return options


def engine_factory(cfg: ReplayConfig, layout: str, pool: tuple[int, int]):
    from plora_jax import Engine

    options = engine_settings(cfg, layout, pool)
    if cfg.model == "tiny":
        import jax.numpy as jnp

        from plora_jax.config import tiny
        from plora_jax.models.llama import init_params

        model_config = tiny()
        params = init_params(model_config, jnp.float32, seed=0, scale=0.2)
        return model_config, lambda **kw: Engine.from_params(model_config, params, **(options | kw))
    model_config = None  # known once an engine has loaded the model

    def make(**kw):
        return Engine.from_pretrained(cfg.model, **(options | kw))

    return model_config, make


def sim_config(cfg: ReplayConfig, layout: str, pool: tuple[int, int]):
    from plora_jax.config import EngineConfig
    from plora_jax.serverless.sim import SimConfig

    return SimConfig(
        engine=EngineConfig(**engine_settings(cfg, layout, pool)),
        instances=cfg.instances,
        min_instances=cfg.min_instances,
        keep_alive_s=cfg.keep_alive_s,
        adapter_store="store" if cfg.adapter_store == "s3" else "disk",
        adapters_on_host=cfg.adapter_store == "host",
    )


def cost_profile(cfg: ReplayConfig, wcfg):
    """The cost profile a simulation runs on, and that `--load` takes capacity from: a profile on
    paper (`--profile`, drawn for the workload's mean rank) or a calibration JSON, with the store
    link `--store-latency-ms` and `--store-mb-s` give, where they do."""
    if cfg.profile:
        from plora_jax.serverless.sim import profiles

        try:
            profile = profiles.named(cfg.profile, mean_rank=sum(wcfg.ranks) / len(wcfg.ranks))[0]
        except ValueError as e:
            raise SystemExit(f"--profile: {e}") from None
    else:
        profile = load_calibration(cfg.calibration)
    link = {}
    if cfg.store_latency_ms > 0:
        link["store_latency_s"] = cfg.store_latency_ms / 1e3
    if cfg.store_mb_s > 0:
        link["store_bytes_per_s"] = cfg.store_mb_s * 1e6
    return dataclasses.replace(profile, **link) if link else profile


def run(cfg: ReplayConfig, wcfg) -> dict:
    from plora_jax.serverless import report

    if cfg.mode not in ("live", "sim"):
        raise SystemExit(f"--mode must be live or sim, got {cfg.mode!r}")
    if cfg.compare and cfg.mode != "sim":
        raise SystemExit("--compare: compares a simulation with a live run (use it with --mode sim)")
    if cfg.adapter_store not in ("", "host", "s3"):
        raise SystemExit(f"--adapter-store: '', host or s3, got {cfg.adapter_store!r}")
    if cfg.adapter_store == "host" and cfg.mode != "sim":
        raise SystemExit("--adapter-store host: every adapter in host memory at the start is for --mode sim")
    if cfg.profile and cfg.mode != "sim":
        raise SystemExit("--profile: a cost profile on paper is for --mode sim")
    if wcfg.warmup_minutes and cfg.mode != "sim":  # the live replay's counters cover the whole run
        raise SystemExit("--warmup-minutes: a measured window after a warm-up is for --mode sim")
    policies = [p for p in cfg.policies.split(",") if p]
    known = set(ALL_POLICIES.split(","))
    if not policies or set(policies) - known:
        raise SystemExit(f"--policies: unknown {sorted(set(policies) - known)}; choose from {ALL_POLICIES}")
    layouts = [x for x in cfg.layout.split(",") if x]
    if not layouts or set(layouts) - set(LORA_LAYOUTS):
        raise SystemExit(f"--layout: choose from paged,contiguous, got {cfg.layout!r}")
    profile = cost_profile(cfg, wcfg) if (cfg.mode == "sim" or cfg.load) else None
    grid = points(cfg, wcfg, profile)
    print(f"machine: {machine()}", flush=True)
    calibration = None
    results = []
    for point in grid:
        w, wc = point.workload, point.workload_config
        warmup = f" after {wc.warmup_minutes} warm-up minutes ({len(w.requests)} requests in all)"
        print(
            f"point: pool budget {point.pool_budget} ({point.lora_pool_pages} pages, {point.max_loras} slots), "
            f"load {point.load}: {point.describe()['measured_requests']} requests, {len(w.ranks)} adapters, "
            f"{wc.minutes} trace minutes at {wc.seconds_per_minute:.3g} s each" + (warmup if wc.warmup_minutes else ""),
            flush=True,
        )
        runs, measured = run_point(cfg, point, layouts, policies, profile)
        calibration = calibration or measured
        results.append((point, runs))
    payload = {
        "machine": machine(),
        "mode": cfg.mode,
        "config": {"replay": dataclasses.asdict(cfg), "workload": dataclasses.asdict(wcfg)},
        "calibration": (calibration or profile).to_dict() if (calibration or profile) else {},
        "points": [],
    }
    for point, runs in results:
        block = {"point": point.describe(), "layouts": {}}
        for layout, by_policy in runs.items():
            report.pair(by_policy)  # the paired cold-start latency, against reactive_sync's cold requests
            summary = {name: r.summary for name, r in by_policy.items()}
            block["layouts"][layout] = {"policies": summary, "claims": report.claims(summary)}
            print(f"\n{cfg.mode} replay, layout {layout}, {_label(point)}:\n{report.table(summary)}")
            line = report.format_claims(report.claims(summary))
            if line:
                print(line)
        if "paged" in runs and "contiguous" in runs:
            mem = {
                p: (runs["paged"][p].summary["adapter_mem_util"], runs["contiguous"][p].summary["adapter_mem_util"])
                for p in runs["paged"]
            }
            block["memory"] = {p: {"paged": a, "contiguous": b} for p, (a, b) in mem.items()}
            print(
                "adapter memory utilisation paged / contiguous: "
                + ", ".join(f"{p} {a:.1%}/{b:.1%}" for p, (a, b) in mem.items())
            )
        payload["points"].append(block)
    first, first_point = payload["points"][0], grid[0]
    payload |= {  # the first point at the top level too (a single-point run's whole result)
        "layouts": first["layouts"],
        "requests": first["point"]["measured_requests"],
        "adapters": len(first_point.workload.ranks),
    }
    if len(layouts) == 1:
        payload["policies"] = first["layouts"][layouts[0]]["policies"]
    if "memory" in first:
        payload["memory"] = first["memory"]
    if cfg.compare:
        payload["compare"] = compare_with_live(cfg.compare, payload)
    write_json(cfg.json or None, payload)
    if cfg.plot:
        point, runs = results[0]
        w = point.workload
        measured = payload["points"][0]["point"]["measured_requests"]
        plot(runs, cfg.plot, f"{cfg.mode} replay: {measured} requests, {len(w.ranks)} adapters, {_label(point)}")
        if len(results) > 1:
            plot_sweep(payload["points"], layouts[0], str(Path(cfg.plot).with_suffix("")) + "_sweep.png")
    return payload


def _label(point: Point) -> str:
    budget = f"budget {point.pool_budget:g}" if point.pool_budget is not None else f"{point.lora_pool_pages} pages"
    return budget + (f", load {point.load:g}" if point.load is not None else "")


def remote_store(cfg: ReplayConfig, adapter_dir: Path, node_cache: Path, stores: contextlib.ExitStack):
    """The adapters of `adapter_dir` in moto's S3 server on 127.0.0.1, reached through a proxy
    of `store_latency_ms` and `store_mb_s`: their prefix, and the engine options that reach it
    (a node cache in `node_cache`)."""
    from benchmarks.stores import S3Server, ThrottledProxy

    s3 = S3Server("replay")
    stores.callback(s3.stop)
    latency_s, rate = (cfg.store_latency_ms or 50.0) / 1e3, (cfg.store_mb_s or 100.0) * 1e6
    proxy = ThrottledProxy(s3.port, latency_s, rate)
    stores.callback(proxy.stop)
    for folder in sorted(adapter_dir.iterdir()):
        if (folder / "adapter_config.json").is_file():
            s3.upload(folder, f"adapters/{folder.name}")
    options = dict(node_cache_dir=str(node_cache), adapter_source_options=s3.options(proxy.url))
    return "s3://replay/adapters", options


def run_point(cfg: ReplayConfig, point: Point, layouts: list[str], policies: list[str], profile):
    """Every policy at one point, per layout: {layout: {policy: Run}}, and (live) the cost
    profile measured from the first layout's runs."""
    from plora_jax.serverless import live, sim

    workload, pool = point.workload, (point.lora_pool_pages, point.max_loras)
    runs: dict = {}
    calibration = None
    if cfg.mode == "sim":
        for layout in layouts:
            runs[layout] = {}
            for policy in policies:
                start = time.perf_counter()
                runs[layout][policy] = sim.simulate(
                    workload, policy, sim_config(cfg, layout, pool), profile, cfg.predictor_checkpoint
                )
                print(f"  {layout}/{policy}: {time.perf_counter() - start:.1f} s", flush=True)
        return runs, None
    with tempfile.TemporaryDirectory(prefix="plora-replay-") as tmp, contextlib.ExitStack() as stores:
        adapter_dir = Path(cfg.adapter_dir) if cfg.adapter_dir else Path(tmp) / "adapters"
        for layout in layouts:
            model_config, make = engine_factory(cfg, layout, pool)
            if model_config is None:
                probe = make(warmup=False, max_loras=0)
                model_config = probe.model_config
                probe.close()
            live.write_adapters(workload, model_config, adapter_dir, TARGETS)
            source = adapter_dir
            if cfg.adapter_store == "s3":
                source, remote = remote_store(cfg, adapter_dir, Path(tmp) / "node", stores)
                make = lambda make=make, remote=remote, **kw: make(**(remote | kw))
            fleet = live.Fleet(
                make, source, workload, cfg.instances, cfg.min_instances, cfg.keep_alive_s,
                record_steps=True, max_num_seqs=cfg.max_num_seqs,
            )  # fmt: skip
            with fleet:
                if fleet.warm:
                    print(
                        f"  {layout}: {len(fleet.warm)} warm engine(s), {fleet.start_s[0]:.0f} s to start", flush=True
                    )
                runs[layout] = {}
                for policy in policies:
                    start = time.perf_counter()
                    runs[layout][policy] = live.replay_live(
                        workload, policy, fleet, cfg.predictor_checkpoint, point.workload_config.seed,
                        cfg.retention_intervals,
                    )  # fmt: skip
                    print(f"  {layout}/{policy}: {time.perf_counter() - start:.0f} s", flush=True)
                if calibration is None and fleet.warm:  # the cost profile, from this layout's runs
                    start_s = sum(fleet.start_s) / len(fleet.start_s)
                    calibration = live.calibrate(fleet.warm[0], start_s, list(runs[layout].values()))
    return runs, calibration


COMPARED = ("cold_starts", "ttft_mean_s")


def compare_with_live(path: str, sim_payload: dict) -> dict:
    """Per layout and policy, the live run's figures (`path`), the simulation's, and sim / live,
    for cold starts and mean TTFT; printed as a table. The evidence that simulated results mean
    something: the same workload, the simulator calibrated from that live run."""
    try:
        live_payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--compare {path}: cannot read ({e})") from None
    if live_payload.get("mode") != "live":
        raise SystemExit(f"--compare {path}: not a live replay (mode {live_payload.get('mode')!r})")
    ours = json.loads(json.dumps(sim_payload["config"]["workload"]))  # as the JSON holds it (lists)
    if live_payload.get("config", {}).get("workload") != ours:
        raise SystemExit(f"--compare {path}: its workload settings differ from this run's")
    out: dict = {}
    rows = ["| layout | policy | live cold starts | sim | sim / live | live TTFT mean | sim | sim / live |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for layout, block in sim_payload["layouts"].items():
        live_block = live_payload.get("layouts", {}).get(layout, {}).get("policies", {})
        for policy, sim_m in block["policies"].items():
            live_m = live_block.get(policy)
            if live_m is None:
                continue
            entry = {}
            for key in COMPARED:
                a, b = live_m[key], sim_m[key]
                entry[key] = {"live": a, "sim": b, "sim_over_live": b / a if a else None}
            out.setdefault(layout, {})[policy] = entry
            c, t = entry["cold_starts"], entry["ttft_mean_s"]
            ratio = lambda x: f"{x:.2f}" if x is not None else "-"
            rows.append(
                f"| {layout} | {policy} | {c['live']} | {c['sim']} | {ratio(c['sim_over_live'])} | "
                f"{t['live']:.3f} s | {t['sim']:.3f} s | {ratio(t['sim_over_live'])} |"
            )
    print("\nlive against simulated, same workload:\n" + "\n".join(rows))
    return out


def plot(runs: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layouts = list(runs)
    fig, axes = plt.subplots(len(layouts), 3, figsize=(15, 4 * len(layouts)), squeeze=False)
    for row, layout in zip(axes, layouts, strict=True):
        for name, r in runs[layout].items():
            done = [x for x in r.records if x.first_token is not None]
            ttft = np.sort([x.first_token - x.arrival for x in done])
            row[0].plot(ttft, np.arange(1, len(ttft) + 1) / max(1, len(ttft)), label=name)
            cold = np.sort([x.arrival for x in r.records if x.cold])
            row[1].step(cold, np.arange(1, len(cold) + 1), where="post", label=name)
            if r.memory:
                t, u = zip(*r.memory, strict=True)
                row[2].plot(t, u, label=name)
        row[0].set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests", title=f"TTFT CDF ({layout})")
        row[1].set(xlabel="replay time (s)", ylabel="cold starts", title=f"cold starts over time ({layout})")
        row[2].set(
            xlabel="replay time (s)", ylabel="live / reserved bytes", title=f"adapter memory utilisation ({layout})"
        )
        row[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


SWEEP_PANELS = (  # (x axis, y key, label); budget panels at the load nearest 1, load panels at the budget nearest 0.3
    ("pool_budget", "cold_starts", "cold starts"),
    ("pool_budget", "baseline_cold_median_s", "paired median cold-start latency (s)"),
    ("load", "ttft_mean_s", "mean TTFT (s)"),
    ("load", "throughput_rps", "throughput (req/s)"),
)


def plot_sweep(blocks: list[dict], layout: str, path: str) -> None:
    """Per policy: cold starts and paired cold-start latency against the pool budget, mean
    TTFT and throughput against the load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def nearest(key: str, target: float):
        values = sorted({b["point"][key] for b in blocks if b["point"][key] is not None})
        return min(values, key=lambda v: abs(v - target)) if values else None

    fixed = {"pool_budget": ("load", nearest("load", 1.0)), "load": ("pool_budget", nearest("pool_budget", 0.3))}
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(5 * len(SWEEP_PANELS), 4))
    for ax, (x_key, y_key, label) in zip(axes, SWEEP_PANELS, strict=True):
        other, value = fixed[x_key]
        chosen = sorted(
            (b for b in blocks if b["point"][x_key] is not None and b["point"][other] == value),
            key=lambda b: b["point"][x_key],
        )
        policies = chosen[0]["layouts"][layout]["policies"] if chosen else {}
        for policy in policies:
            xs = [b["point"][x_key] for b in chosen]
            ys = [b["layouts"][layout]["policies"][policy].get(y_key, float("nan")) for b in chosen]
            ax.plot(xs, ys, marker="o", label=policy)
        ax.set(xlabel=x_key.replace("_", " "), ylabel=label, title=f"{label} ({layout}, {other} {value})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    run(*config_and_workload(ReplayConfig, __doc__, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
