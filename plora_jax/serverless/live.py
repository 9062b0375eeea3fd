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

import threading
import time
from pathlib import Path

import numpy as np

from ..engine.sampling import SamplingParams
from ..lora.peft import save_random_adapter
from ..metrics import adapter_mem_util
from ..names import BASELINE_POLICY
from .instances import InstanceLoad, keep_alive_expired, pick_instance
from .report import RequestRecord, Run, summarize
from .sim import Calibration
from .workload import Workload, workload_policy


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
        engine.reset_adapters("sync" if policy == BASELINE_POLICY else "async")
    interval = workload.config.seconds_per_minute
    origin = time.monotonic()  # replay time 0; set again just before the first request
    clock = lambda: time.monotonic() - origin
    adopted = [workload_policy(policy, workload, interval, clock, predictor_checkpoint) for _ in engines]
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
    while not all(h.finished for _, h in handles):  # memory use keeps being sampled until the last request ends
        now = time.monotonic() - origin
        if now >= next_sample:
            mem_samples.append((now, [e.stats() for e in engines]))
            next_sample += interval
        time.sleep(min(0.01, max(0.0, next_sample - now)))
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
    memory = _memory_series(mem_samples)
    extra = {
        k: delta(k) for k in ("compiles_after_warmup", "adapter_loads", "adapter_load_s_total", "policy_fallbacks")
    }
    util = float(np.mean([u for _, u in memory])) if memory else 0.0
    return Run(summarize(records, counters, util, extra), records, memory)


def _memory_series(mem_samples: list[tuple[float, list[dict]]]) -> list[tuple[float, float]]:
    """(time, adapter memory utilisation over every instance up then), from stats samples."""
    return [
        (t, adapter_mem_util(sum(s["adapter_live_bytes"] for s in up), sum(s["adapter_reserved_bytes"] for s in up)))
        for t, up in mem_samples
        if sum(s["adapter_reserved_bytes"] for s in up)
    ]


def _holds(engine, adapter: str) -> bool:
    """Whether the adapter is placed on the engine's device, from the snapshot the engine last
    published (a routing hint that may be a step out of date, never a decision that must hold)."""
    return adapter in engine.resident_adapters()


def _resident_set(engine) -> list[str]:
    """Registered adapters, smallest first, as many as the device pool holds at once."""
    config = engine.config
    pages_left, slots_left = engine.stats().get("adapter_pages_total", 0), config.max_loras
    slot_pages = -(-config.max_lora_rank // config.page_rows)  # what a contiguous slot reserves
    chosen = []
    for a in sorted(engine.adapters(), key=lambda a: a["num_pages"]):
        pages = slot_pages if config.layout == "contiguous" else a["num_pages"]
        if pages <= pages_left and slots_left > 0:
            chosen.append(a["name"])
            pages_left -= pages
            slots_left -= 1
    return chosen


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
    chunk = min(engine.runner.buckets.prefill[-1], engine.max_model_len // 2)
    short, long = ttft(16), ttft(chunk)
    token_s = max(0.0, (long - short) / (chunk - 16))
    # The adapters' cost: the same full batch and long prompt with every row on an adapter (as
    # many distinct ones as fit the pool at once, loaded first so no load is timed).
    adapters = _resident_set(engine)
    adapter_row_s = adapter_token_s = 0.0
    if adapters:
        from ..policies import make_policy

        engine.set_policy(make_policy("lru"))  # keep them resident between the timed runs
        names = [adapters[i % len(adapters)] for i in range(rows)]
        prompts = [_prompt(rng, 8, vocab) for _ in range(rows)]
        engine.generate(prompts, greedy(2), adapters=names)  # loads them
        outs = engine.generate(prompts, greedy(33), adapters=names)
        adapter_row_s = max(0.0, (float(np.median([o.metrics.tpot_s for o in outs])) - full) / rows)
        prompt = _prompt(rng, chunk, vocab)
        engine.generate([prompt], greedy(1), adapters=[adapters[0]])
        timed = [engine.generate([prompt], greedy(1), adapters=[adapters[0]])[0] for _ in range(3)]
        with_adapter = float(np.median([o.metrics.ttft_s - o.metrics.adapter_wait_s for o in timed]))
        adapter_token_s = max(0.0, (with_adapter - long) / chunk)
    stats = engine.stats()
    loads = [(r["adapter_load_s_total"], r["bytes_host_to_device"]) for r in runs or () if r.get("adapter_loads")]
    seconds, nbytes = sum(s for s, _ in loads), sum(b for _, b in loads)
    return Calibration(
        source="live engine on this machine (plora_jax.serverless.live.calibrate)",
        decode_base_s=max(0.0, one - row_s),
        decode_row_s=row_s,
        prefill_base_s=max(0.0, short - 16 * token_s - one),
        prefill_token_s=token_s,
        decode_adapter_row_s=adapter_row_s,
        prefill_adapter_token_s=adapter_token_s,
        load_base_s=0.0,
        h2d_bytes_per_s=nbytes / seconds if seconds else 2e9,
        disk_bytes_per_s=0.0,  # 0: folded into h2d (the live loads' rate includes their disk reads)
        instance_start_s=instance_start_s,
        bytes_per_rank=int(stats.get("adapter_page_bytes", 0) // engine.config.page_rows),
    )


class _Slot:
    """One instance slot of the live serverless replay: off, starting or up."""

    def __init__(self):
        self.engine = None
        self.state = "off"
        self.pending: list = []  # TraceRequests routed here while it starts
        self.handles: list = []
        self.idle_since: float | None = None
        self.error: BaseException | None = None

    def load(self) -> int:
        return len(self.pending) + sum(not h.finished for h in self.handles)


def _expire(slots: list[_Slot], now: float, keep_alive_s: float, min_instances: int, final_stats: list) -> None:
    """Stop instances idle for `keep_alive_s`, down to `min_instances` (their counters are kept)."""
    for slot in slots:
        if slot.state != "up":
            continue
        if slot.load():
            slot.idle_since = None
            continue
        slot.idle_since = now if slot.idle_since is None else slot.idle_since
        active = sum(s.state != "off" for s in slots)
        if keep_alive_expired(slot.idle_since, now, keep_alive_s, active, min_instances):
            final_stats.append(slot.engine.stats())
            slot.engine.close()
            slot.engine, slot.state, slot.handles, slot.idle_since = None, "off", [], None


def replay_serverless(
    workload: Workload,
    policy: str,
    make_engine,
    adapter_dir: str | Path,
    max_instances: int,
    min_instances: int = 0,
    keep_alive_s: float = 60.0,
    max_num_seqs: int = 16,
    predictor_checkpoint: str = "",
    seed: int = 0,
) -> Run:
    """Replay with instances that start on demand and stop after `keep_alive_s` idle (down to
    `min_instances`, which start before the replay). A start is an engine's construction,
    warm-up and adapter registration, on its own thread; requests routed to a starting instance
    wait for it, and their TTFT includes that wait. Routing is `pick_instance`'s."""
    if max_instances < 1 or not 0 <= min_instances <= max_instances:
        raise ValueError(f"need 0 <= min_instances <= max_instances >= 1, got {min_instances}, {max_instances}")
    loads = "sync" if policy == BASELINE_POLICY else "async"
    interval = workload.config.seconds_per_minute
    lock = threading.Lock()
    slots = [_Slot() for _ in range(max_instances)]
    origin, origin_perf = time.monotonic(), time.perf_counter()
    clock = lambda: time.monotonic() - origin
    rng = np.random.default_rng(seed)
    start_times, start_waits, final_stats, submitted = [], [], [], []

    def submit(slot: _Slot, tr) -> None:
        engine = slot.engine
        prompt_len = min(tr.prompt_tokens, engine.max_model_len - 2)
        max_tokens = max(1, min(tr.output_tokens, engine.max_model_len - prompt_len - 1))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        handle = engine.submit(_prompt(rng, prompt_len, engine.model_config.vocab_size), params, adapter=tr.adapter)
        slot.handles.append(handle)
        submitted.append((tr.arrival_s, handle))

    def boot(slot: _Slot) -> None:
        try:
            started = time.perf_counter()
            engine = make_engine(adapter_loads=loads)
            engine.add_adapter_dir(adapter_dir)
            p = workload_policy(policy, workload, interval, clock, predictor_checkpoint)
            if hasattr(p, "set_origin"):
                p.set_origin(origin)
            engine.set_policy(p)
            with lock:
                slot.engine, slot.state = engine, "up"
                start_times.append(time.perf_counter() - started)
                for tr in slot.pending:
                    start_waits.append(clock() - tr.arrival_s)
                    submit(slot, tr)
                slot.pending.clear()
        except BaseException as e:  # reported by the replay thread
            slot.error = e

    def launch(slot: _Slot) -> threading.Thread:
        slot.state, slot.idle_since = "starting", None
        thread = threading.Thread(target=boot, args=(slot,), name="plora-instance-start", daemon=True)
        thread.start()
        return thread

    def check() -> None:
        failed = next((s.error for s in slots if s.error is not None), None)
        if failed is not None:
            raise RuntimeError(f"an instance failed to start: {failed}") from failed

    for thread in [launch(slots[i]) for i in range(min_instances)]:
        thread.join()
    check()
    start_times.clear()  # warm before the replay: not instance cold starts
    origin, origin_perf = time.monotonic(), time.perf_counter()
    mem_samples, next_sample = [], 0.0
    try:
        for tr in workload.requests:
            while True:
                now = clock()
                with lock:
                    check()
                    if now >= next_sample:
                        mem_samples.append((now, [s.engine.stats() for s in slots if s.state == "up"]))
                        next_sample += interval
                    _expire(slots, now, keep_alive_s, min_instances, final_stats)
                if now >= tr.arrival_s:
                    break
                time.sleep(min(0.01, tr.arrival_s - now))
            with lock:
                active = [i for i, s in enumerate(slots) if s.state != "off"]
                rows = [
                    InstanceLoad(
                        i, slots[i].state == "up" and _holds(slots[i].engine, tr.adapter), slots[i].load(), max_num_seqs
                    )
                    for i in active
                ]
                index = pick_instance(rows)
                off = [s for s in slots if s.state == "off"]
                if index is not None:
                    slot = slots[index]
                elif off:
                    slot = off[0]
                    launch(slot)
                else:
                    slot = min((slots[i] for i in active), key=_Slot.load)
                if slot.state == "up":
                    submit(slot, tr)
                else:
                    slot.pending.append(tr)
        stops = len(final_stats)  # so far only `_expire` has stopped instances
        while True:  # requests still waiting for a starting instance
            with lock:
                check()
                if not any(s.pending for s in slots):
                    break
            time.sleep(0.01)
        records = []
        for arrival, handle in submitted:
            out = handle.result()
            m = out.metrics
            at = m.arrival_time - origin_perf  # when the engine got it (later than arrival if it waited)
            wait = max(0.0, at - arrival)
            records.append(
                RequestRecord(
                    arrival, at + m.ttft_s, at + m.e2e_s, m.cold_start, m.adapter_wait_s, len(out.token_ids), wait
                )
            )
    finally:
        with lock:
            for slot in slots:
                if slot.engine is not None:
                    final_stats.append(slot.engine.stats())
                    slot.engine.close()
                    slot.engine, slot.state = None, "off"
    total = lambda k: sum(s.get(k, 0) for s in final_stats)
    keys = ("cold_starts", "prefetch_issued", "prefetch_used", "prefetch_hits", "bytes_host_to_device")
    counters = {k: total(k) for k in (*keys, "bytes_disk_to_host")}
    memory = _memory_series(mem_samples)
    extra = {
        "compiles_after_warmup": total("compiles_after_warmup"),
        "instance_starts": len(start_times),
        "instance_start_mean_s": float(np.mean(start_times)) if start_times else 0.0,
        "instance_start_wait_mean_s": float(np.mean(start_waits)) if start_waits else 0.0,
        "instance_stops": stops,  # after the keep-alive, before the replay's end
    }
    util = float(np.mean([u for _, u in memory])) if memory else 0.0
    return Run(summarize(records, counters, util, extra), records, memory)
