"""Live replay: a workload against real engines on this machine, in real time.

`replay_live` starts `instances` engines (each the base model with every adapter of the
workload registered from disk; none is loaded), adopts the policy on each, and submits every
request at its arrival time from one thread: token-id prompts of the trace's lengths, greedy,
`ignore_eos` so each produces exactly its trace output length. Requests go to an instance by
`instances.pick_instance` (affinity, then the least loaded). The engines' own metrics (TTFT,
adapter wait, cold start) and counters make the summary, so live and simulated runs are
measured alike (`report.summarize`).

`calibrate` measures what the simulator needs from a live engine: decode step time at one row
and at a full batch, prefill time per token, the instance start time (the engine's construction,
with parameters and executables from the caches), and after a replay the loads' effective
bytes per second.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..adapters import save_random_adapter
from ..sampling import SamplingParams
from .instances import InstanceLoad, pick_instance
from .report import RequestRecord, Run, summarize
from .simulator import Calibration, policy_for
from .workload import Workload


def write_adapters(workload: Workload, model_config, folder: str | Path, targets: tuple[str, ...]) -> Path:
    """One random PEFT adapter folder per workload adapter, at its rank (skips existing ones)."""
    folder = Path(folder)
    for i, (name, rank) in enumerate(workload.ranks.items()):
        path = folder / name
        if not (path / "adapter_config.json").exists():
            save_random_adapter(path, model_config, rank, targets, seed=i, scale=0.02, dtype=np.float16)
    return folder


def _prompt(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab - 1, size=n).tolist()


def start_engines(make_engine, instances: int, adapter_dir: str | Path, workload: Workload) -> list:
    """`instances` warm engines with every adapter of `workload` registered from `adapter_dir`."""
    engines = []
    try:
        for _ in range(instances):
            engine = make_engine()
            engines.append(engine)
            result = engine.add_adapter_dir(adapter_dir)
            missing = set(workload.ranks) - set(result["added"])
            if missing:
                raise ValueError(
                    f"{adapter_dir}: adapters missing or refused: {sorted(missing)[:5]} {result['errors']}"
                )
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines


def replay_live(workload: Workload, policy: str, engines: list, predictor_checkpoint: str = "", seed: int = 0) -> Run:
    """Run `workload` under `policy` on `engines` (see `start_engines`), from empty adapter pools
    and host caches: every policy starts from the same cold state on the same warm engines."""
    instances = len(engines)
    for engine in engines:
        engine.reset_adapters("sync" if policy == "reactive_sync" else "async")
    interval = workload.config.seconds_per_minute
    origin = time.monotonic()  # replay time 0; set again just before the first request
    clock = lambda: time.monotonic() - origin
    adopted = [policy_for(policy, workload, interval, clock, predictor_checkpoint) for _ in engines]
    before = [e.stats() for e in engines]  # before adoption: a policy may prefetch at once
    for engine, p in zip(engines, adopted, strict=True):
        engine.set_policy(p)
    rng = np.random.default_rng(seed)
    vocab = engines[0].model_config.vocab_size
    max_len = engines[0].max_model_len
    handles, mem_samples = [], []  # mem_samples: (time, [stats per engine])
    origin, origin_perf = time.monotonic(), time.perf_counter()
    for p in adopted:
        if hasattr(p, "set_origin"):
            p.set_origin(origin)  # the oracle's arrival times count from here
    next_sample = 0.0
    for tr in workload.requests:
        while True:
            now = time.monotonic() - origin
            if now >= next_sample:  # memory use, once per interval
                mem_samples.append((now, [e.stats() for e in engines]))
                next_sample += interval
            wait = min(tr.arrival_s, next_sample) - now
            if wait <= 0 and now >= tr.arrival_s:
                break
            time.sleep(max(wait, 0.0))
        prompt_len = min(tr.prompt_tokens, max_len - 2)
        params = SamplingParams(
            max_tokens=max(1, min(tr.output_tokens, max_len - prompt_len - 1)), temperature=0.0, ignore_eos=True
        )
        index = 0
        if instances > 1:
            inflight = [sum(not h.finished for i, h in handles if i == k) for k in range(instances)]
            index = pick_instance(
                [
                    InstanceLoad(k, _holds(e, tr.adapter), inflight[k], e.config.max_num_seqs)
                    for k, e in enumerate(engines)
                ]
            )
            index = index if index is not None else min(range(instances), key=inflight.__getitem__)
        handle = engines[index].submit(_prompt(rng, prompt_len, vocab), params, adapter=tr.adapter)
        handles.append((index, handle))
    records = []
    for _, handle in handles:
        out = handle.result()
        m = out.metrics
        arrival = m.arrival_time - origin_perf  # seconds since the replay started
        records.append(
            RequestRecord(
                arrival, arrival + m.ttft_s, arrival + m.e2e_s, m.cold_start, m.adapter_wait_s, len(out.token_ids)
            )
        )
    after = [e.stats() for e in engines]
    delta = lambda k: sum(a.get(k, 0) - b.get(k, 0) for a, b in zip(after, before, strict=True))
    counters = {
        k: delta(k)
        for k in (
            "cold_starts",
            "prefetch_issued",
            "prefetch_used",
            "prefetch_hits",
            "bytes_host_to_device",
            "bytes_disk_to_host",
        )
    }
    memory = [
        (t, sum(s["adapter_live_bytes"] for s in sample) / sum(s["adapter_reserved_bytes"] for s in sample))
        for t, sample in mem_samples
        if sum(s["adapter_reserved_bytes"] for s in sample)
    ]
    extra = {
        k: delta(k) for k in ("compiles_after_warmup", "adapter_loads", "adapter_load_s_total", "policy_fallbacks")
    }
    util = float(np.mean([u for _, u in memory])) if memory else 0.0
    return Run(summarize(records, counters, util, extra), records, memory)


def _holds(engine, adapter: str) -> bool:
    """Whether the adapter is placed on the engine's device (a read of loop-owned state from
    another thread: a routing hint that may be a step out of date, never a decision that must hold)."""
    lora = engine._lora
    return lora is not None and lora.pages.get(adapter) is not None


def calibrate(engine, instance_start_s: float, runs: list[dict] | None = None) -> Calibration:
    """The simulator's costs measured on a warm `engine`: decode steps at one row and at a full
    batch, prefill per token, and the loads' effective bytes per second from live replay
    summaries `runs`; `instance_start_s` is how long the engine took to start (construction and
    warm-up, with whatever the parameter and compilation caches held)."""
    rng = np.random.default_rng(0)
    vocab, rows = engine.model_config.vocab_size, engine.config.max_num_seqs
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def tpot(batch: int) -> float:
        outs = engine.generate([_prompt(rng, 8, vocab) for _ in range(batch)], greedy(33))
        return float(np.median([o.metrics.tpot_s for o in outs]))

    def ttft(tokens: int) -> float:
        outs = [engine.generate([_prompt(rng, tokens, vocab)], greedy(1))[0] for _ in range(3)]
        return float(np.median([o.metrics.ttft_s for o in outs]))

    one, full = tpot(1), tpot(rows)
    row_s = max(0.0, (full - one) / max(1, rows - 1))
    chunk = min(engine.prefill_buckets[-1], engine.max_model_len // 2)
    short, long = ttft(16), ttft(chunk)
    token_s = max(0.0, (long - short) / (chunk - 16))
    lora = engine._lora
    loads = [(r["adapter_load_s_total"], r["bytes_host_to_device"]) for r in runs or () if r.get("adapter_loads")]
    seconds, nbytes = sum(s for s, _ in loads), sum(b for _, b in loads)
    return Calibration(
        source="live engine on this machine (plora_jax.serverless.live.calibrate)",
        decode_base_s=max(0.0, one - row_s),
        decode_row_s=row_s,
        prefill_base_s=max(0.0, short - 16 * token_s - one),
        prefill_token_s=token_s,
        load_base_s=0.0,
        h2d_bytes_per_s=nbytes / seconds if seconds else 2e9,
        disk_bytes_per_s=0.0,  # 0: folded into h2d (the live loads' rate includes their disk reads)
        instance_start_s=instance_start_s,
        bytes_per_rank=int(lora.page_bytes // lora.page_rows) if lora is not None else 0,
    )
