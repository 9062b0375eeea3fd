"""P-LoRA on Ray Serve against Serve's default multiplexing, on the same Azure-derived requests:

    python -m benchmarks.cluster --json OUT [--model llama --adapters 16 --minutes 8 --max-replicas 2]

One workload (`plora_jax.serverless.workload`: Azure functions as adapters, their per-minute
counts compressed to `--seconds-per-minute`, prompt and output lengths from the Azure LLM
trace, scaled down for this CPU) is replayed twice on one local Ray instance: through the
`serving.cluster` application with our router, forecaster pre-loads and forecast autoscaling
(`plora`), and with Serve's defaults (`serve`: its power-of-two router with multiplex affinity,
queue-length autoscaling, no forecaster). Both scale LoraEngine replicas between 0 and
`--max-replicas` with the same keep-alive, and run the same engines (LRU on each device pool).

The requests go through the application's Python client (`serving.cluster.gateway.ClusterEngine`,
what the gateway runs) so that each result carries the engine's metrics: a cold start is a
request whose adapter was not on its replica's device, its wait the time until it was; TTFT is
measured here, from the request's arrival to its first token, and includes a replica's start.
Printed and in `--json`: per arm requests, completed, lost (no final event), cold starts, the
paired cold-start latency (over the requests cold under `serve`), mean and p99 TTFT, replica
starts (increases of the replica count, polled) and replica-seconds, why requests failed, and
Ray's start time and memory (resident set of Ray's own processes against the engine replicas').
A warm-up deployment serves one request before either arm, so that neither pays alone for
filling the compilation and parameter caches.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from plora_jax.cli import add_dataclass_args, dataclass_from_args
from plora_jax.config import EngineConfig
from plora_jax.engine.outputs import RequestFailed
from plora_jax.engine.sampling import SamplingParams
from plora_jax.serverless.report import RequestRecord, pair, summarize
from plora_jax.serverless.workload import WorkloadConfig, generate, request_lengths

ARMS = ("plora", "serve")


@dataclass(frozen=True)
class ClusterBench:
    model: str = "llama"  # the replicas' model ("llama": SmolLM2-135M; or a .gguf file)
    adapters: int = 16  # Azure functions replayed as adapters
    minutes: int = 8  # trace minutes
    start_minute: int = 300  # first trace minute
    seconds_per_minute: float = 15.0  # one trace minute lasts this long (also the forecaster's interval)
    token_scale: float = 0.05  # prompt and output lengths scaled down for this CPU
    max_prompt_tokens: int = 48
    max_output_tokens: int = 24
    max_replicas: int = 2
    keep_alive_s: float = 30.0  # the last replica's idle seconds before scale to zero
    max_loras: int = 3  # device adapter slots per replica
    replica_cpus: float = 0.5
    seed: int = 0
    cache_dir: str = ""  # the engines' cache ("": the default)
    port: int = 8000  # Serve's HTTP proxy (on 127.0.0.1; the replay itself uses the Python client)
    json: str = ""  # write the results here


def rss_by_role() -> dict:
    """Resident memory (MiB) of this machine's Ray processes: the engine replicas, and the rest."""
    import psutil

    engine = ray_own = 0
    for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        mem = proc.info["memory_info"].rss if proc.info["memory_info"] else 0
        if "LoraEngine" in cmd:
            engine += mem
        elif "ray" in cmd and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "default_worker" in cmd):
            ray_own += mem
    return {"engine_replicas_mib": engine / 2**20, "ray_mib": ray_own / 2**20}


async def replay(client, workload, max_model_len: int, vocab: int, seed: int, app: str) -> dict:
    """Send every request at its arrival time; returns the records, the replica starts, the
    replica-seconds (replicas up, integrated over the replay) and why requests failed."""
    from ray import serve

    rng = np.random.default_rng(seed)
    prompts = []
    for request in workload.requests:
        n, max_tokens = request_lengths(request, max_model_len)
        prompts.append((rng.integers(100, vocab - 1, size=max(1, n)).tolist(), max_tokens))
    loop = asyncio.get_running_loop()
    origin = time.perf_counter()
    records: list[RequestRecord | None] = [None] * len(prompts)
    starts, replica_s = 0, 0.0
    failures: Counter = Counter()
    done = asyncio.Event()

    async def watch_replicas() -> None:
        nonlocal starts, replica_s
        last, seen = None, time.perf_counter()
        while not done.is_set():
            status = await asyncio.to_thread(serve.status)
            states = status.applications[app].deployments["LoraEngine"].replica_states
            count = sum(n for s, n in states.items() if str(s).split(".")[-1] in ("STARTING", "RUNNING"))
            now = time.perf_counter()
            if last is not None:
                starts += max(0, count - last)
                replica_s += last * (now - seen)
            last, seen = count, now
            await asyncio.sleep(0.25)  # the polling period of a counter, not a wait for another actor

    async def one(i: int) -> None:
        request = workload.requests[i]
        await asyncio.sleep(max(0.0, origin + request.arrival_s - time.perf_counter()))  # its arrival time
        ids, max_tokens = prompts[i]
        arrival = time.perf_counter()
        first = None
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        try:
            handle = client.submit(ids, params, request.adapter)
            output = None
            async for event in handle.events():
                if first is None and event.token_ids:
                    first = time.perf_counter()
                if event.finished:
                    output = event.output
            m = output.metrics
            records[i] = RequestRecord(
                arrival, first, time.perf_counter(), m.cold_start, m.adapter_wait_s, len(output.token_ids), request=i
            )
        except RequestFailed as e:
            failures[str(e)[:160]] += 1
            records[i] = RequestRecord(arrival, None, None, False, 0.0, 0, request=i)

    watcher = loop.create_task(watch_replicas())
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    done.set()
    await watcher
    return {"records": records, "replica_starts": starts, "replica_s": replica_s, "failures": dict(failures)}


def arm_config(arm: str, bench: ClusterBench, port: int, app_name: str = ""):
    """One arm's `ClusterConfig`: the same replicas, limits and keep-alive for both; Serve's
    arm caps each replica's registered adapters at its device slots, as its multiplex LRU does."""
    from serving.cluster import ClusterConfig

    return ClusterConfig(
        routing=arm,
        app_name=app_name or f"bench-{arm}",
        port=port,
        min_replicas=0,
        max_replicas=bench.max_replicas,
        initial_replicas=1,
        keep_alive_s=bench.keep_alive_s,
        upscale_delay_s=1.0,
        downscale_delay_s=bench.keep_alive_s,
        target_ongoing_requests=2.0,
        replica_cpus=bench.replica_cpus,
        max_adapters_per_replica=bench.max_loras if arm == "serve" else -1,
        forecast_interval_s=bench.seconds_per_minute,
        report_s=1.0,
        routing_stats_period_s=0.5,
    )


def warm_up(bench: ClusterBench, engine_config: EngineConfig, port: int) -> float:
    """Deploy once and serve one request, then delete: the first deployment on a machine fills
    the compilation and parameter caches, which neither measured arm should pay alone."""
    from ray import serve

    from serving.cluster import start

    config = arm_config("serve", bench, port, app_name="bench-warm-up")
    started = time.perf_counter()
    start(config, engine_config, route_prefix="/warm-up")
    engine = serve.get_deployment_handle("LoraEngine", config.app_name)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    async def one() -> None:
        async for _ in engine.options(multiplexed_model_id="", stream=True).generate.remote([1, 2, 3], params):
            pass

    asyncio.run(one())
    serve.delete(config.app_name)
    return time.perf_counter() - started


def run_arm(arm: str, bench: ClusterBench, engine_config: EngineConfig, workload, folder: Path, port: int) -> dict:
    from ray import serve

    from serving.cluster import start
    from serving.cluster.app import engine_options
    from serving.cluster.gateway import ClusterEngine

    config = arm_config(arm, bench, port)
    started = time.perf_counter()
    start(config, engine_config, route_prefix=f"/{config.app_name}")
    deploy_s = time.perf_counter() - started
    engine = serve.get_deployment_handle("LoraEngine", config.app_name)
    forecaster = serve.get_deployment_handle("Forecaster", config.app_name) if arm == "plora" else None
    client = ClusterEngine(
        engine, engine_config.model, engine_options(config, engine_config), forecaster, config.report_s
    )
    client.add_adapter_dir(folder)
    vocab = client.inputs.vocab_size
    result = asyncio.run(replay(client, workload, client.inputs.max_model_len, vocab, bench.seed, config.app_name))
    memory = rss_by_role()
    serve.delete(config.app_name)
    lost = sum(r.finished is None for r in result["records"])
    return {**result, "lost": lost, "deploy_s": deploy_s, **memory}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    add_dataclass_args(parser, ClusterBench)
    bench = dataclass_from_args(ClusterBench, parser.parse_args(argv))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("REPLICA", "HANDLE"):
        os.environ.setdefault(f"RAY_SERVE_{name}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    import ray
    from ray import serve

    from plora_jax.models.loader import load_front_end
    from plora_jax.serverless.live import write_adapters
    from plora_jax.serverless.report import Run

    workload = generate(
        WorkloadConfig(
            adapters=bench.adapters,
            minutes=bench.minutes,
            start_minute=bench.start_minute,
            seconds_per_minute=bench.seconds_per_minute,
            token_scale=bench.token_scale,
            max_prompt_tokens=bench.max_prompt_tokens,
            max_output_tokens=bench.max_output_tokens,
            seed=bench.seed,
        )
    )
    model_config, _ = load_front_end(bench.model, bench.cache_dir or None)
    page_rows = EngineConfig.page_rows
    engine_config = EngineConfig(
        model=bench.model,
        dtype="float32",
        max_model_len=128,
        num_kv_blocks=80,
        max_num_seqs=8,
        max_loras=bench.max_loras,
        # Room for `max_loras` adapters of the workload's largest rank (and the reserved page 0),
        # so every adapter fits and the slots, not the pages, bound residency.
        lora_pool_pages=bench.max_loras * -(-max(workload.ranks.values()) // page_rows) + 1,
        page_rows=page_rows,
        cache_dir=bench.cache_dir or None,
    )
    folder = Path(tempfile.mkdtemp(prefix="plora-cluster-adapters-"))
    write_adapters(workload, model_config, folder, ("q_proj", "v_proj"))
    began = time.perf_counter()
    fresh = not ray.is_initialized()
    if fresh:
        ray.init(include_dashboard=False, num_cpus=8, object_store_memory=256 * 2**20, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": bench.port})
    ray_start_s = time.perf_counter() - began
    idle_memory = rss_by_role()
    warm_up_s = warm_up(bench, engine_config, bench.port)
    arms, runs = {}, {}
    for arm in ARMS:
        result = run_arm(arm, bench, engine_config, workload, folder, bench.port)
        records = result.pop("records")
        runs[arm] = Run(summarize(records, {}, 0.0), records, [])
        arms[arm] = result
    pair(runs, baseline="serve")
    table = {}
    for arm, run in runs.items():
        s = run.summary
        table[arm] = {
            "requests": s["requests"],
            "completed": s["completed"],
            "lost": arms[arm]["lost"],
            "cold_starts": s["cold_starts"],
            "baseline_cold_median_s": s.get("baseline_cold_median_s"),
            "baseline_cold_mean_s": s.get("baseline_cold_mean_s"),
            "ttft_mean_s": s["ttft_mean_s"],
            "ttft_p99_s": s["ttft_p99_s"],
            "throughput_rps": s["throughput_rps"],
            "replica_starts": arms[arm]["replica_starts"],
            "replica_s": arms[arm]["replica_s"],
            "failures": arms[arm]["failures"],
            "deploy_s": arms[arm]["deploy_s"],
            "engine_replicas_mib": arms[arm]["engine_replicas_mib"],
            "ray_mib": arms[arm]["ray_mib"],
        }
    ours, base = table["plora"], table["serve"]
    ratio = lambda a, b: a / b if b else float("nan")
    result = {
        "config": dataclasses.asdict(bench),
        "requests": len(workload.requests),
        "ray_start_s": ray_start_s,
        "ray_idle_memory": idle_memory,
        "warm_up_s": warm_up_s,
        "arms": table,
        "cold_starts_ratio": ratio(ours["cold_starts"], base["cold_starts"]),
        "ttft_mean_change": ratio(ours["ttft_mean_s"], base["ttft_mean_s"]) - 1.0,
        "paired_cold_median_change": ratio(ours["baseline_cold_median_s"] or 0.0, base["baseline_cold_median_s"] or 0.0)
        - 1.0,
    }
    print(f"{len(workload.requests)} requests, {bench.adapters} adapters")
    print(f"Ray start {ray_start_s:.1f} s; memory with no replica {idle_memory}")
    header = [
        "arm",
        "done",
        "lost",
        "cold",
        "paired med s",
        "ttft mean s",
        "ttft p99 s",
        "starts",
        "replica s",
        "engine MiB",
        "ray MiB",
    ]
    print(" | ".join(header))
    for arm, t in table.items():
        cells = [arm, t["completed"], t["lost"], t["cold_starts"], f"{t['baseline_cold_median_s'] or 0:.3f}"]
        cells += [f"{t['ttft_mean_s']:.3f}", f"{t['ttft_p99_s']:.3f}", t["replica_starts"], f"{t['replica_s']:.0f}"]
        cells += [f"{t['engine_replicas_mib']:.0f}", f"{t['ray_mib']:.0f}"]
        print(" | ".join(str(c) for c in cells))
    for arm, t in table.items():
        for why, n in t["failures"].items():
            print(f"{arm}: {n} failed: {why}")
    print(
        f"plora / serve: cold starts {result['cold_starts_ratio']:.2f}x, mean TTFT {result['ttft_mean_change']:+.0%}, "
        f"paired cold-start median {result['paired_cold_median_change']:+.0%}"
    )
    write_json(bench.json or None, result)
    if fresh:
        serve.shutdown()
        ray.shutdown()
    return result


if __name__ == "__main__":
    main()
