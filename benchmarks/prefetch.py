"""Decode step time with and without a concurrent adapter load: `python -m benchmarks.prefetch [--json OUT]`.

One engine on the real model decodes `--rows` greedy requests. The step time is the mean
interval between consecutive tokens of one running request (every step yields one token per
decode row). It is measured with no adapter traffic, and while an adapter loads, per source
(`--source`): from `host` (the copy in the host cache: the loop issues the copy to the device
and commits it at the first step boundary after it lands) and from `disk` (the host copy is
dropped first, so the transfer thread reads and lays out the PEFT file, then the loop copies
it). The phases alternate in one process (idle, load, idle, load, ...), so drift of the
machine's speed hits them alike. Goal (issue 16): step_ms_during_load <= 1.2 x step_ms_idle.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import machine, write_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--loads", type=int, default=20, help="loads per source")
    parser.add_argument("--source", default="host,disk", help="where loads come from: host, disk or both")
    parser.add_argument("--idle-s", type=float, default=1.5, help="idle seconds before each load")
    parser.add_argument(
        "--xla-single-thread",
        action="store_true",
        help="run XLA's CPU computations on one thread, leaving the other cores to the transfer thread "
        "(as on a GPU host, where the step does not run on the CPU); must come before jax is imported",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    sources = [x for x in args.source.split(",") if x]
    if not sources or set(sources) - {"host", "disk"}:
        parser.error(f"--source: host, disk or host,disk, got {args.source!r}")
    if args.xla_single_thread:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )

    from plora_jax import Engine, SamplingParams
    from plora_jax.lora.peft import save_random_adapter
    from plora_jax.policies import Decision

    engine = Engine.from_pretrained(args.model, warmup=False, max_num_seqs=args.rows, max_model_len=2048, policy="lru")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="plora-prefetch-") as tmp:
        path = save_random_adapter(
            Path(tmp) / "a",
            engine.model_config,
            args.rank,
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
        size_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        engine.add_adapter("a", path)
        ticks: list[float] = []
        phase: list[str] = []
        state = {"phase": "warm"}
        handles = [
            engine.submit([1 + i, 2, 3], SamplingParams(max_tokens=1800, temperature=0, ignore_eos=True))
            for i in range(args.rows)
        ]

        def watch():
            for _ in handles[0]:
                ticks.append(time.perf_counter())
                phase.append(state["phase"])

        threading.Thread(target=watch, daemon=True).start()
        while len(ticks) < 10:  # compiles happen on first use: wait until decoding runs steadily
            time.sleep(0.05)
        load_s = {source: [] for source in sources}
        windows: list[tuple[str, float, float]] = []  # (source, start, end) of every load

        manager = engine.core.lora

        def drop_and_load(source: str):
            manager.apply(Decision(evict=["a"]))
            if source == "disk":
                manager.drop_host_copy("a")  # force a read of the folder
            manager.start_load("a", prefetch=True)  # a policy prefetch: the background reader

        def poll(until: float | None = None) -> None:
            # Both phases poll the stats alike (every 5 ms), so the poller's share of the GIL
            # weighs on idle steps as much as on steps during a load.
            while engine.stats()["adapters_loading"] if until is None else time.perf_counter() < until:
                time.sleep(0.005)

        for source in sources:  # first loads compile the commit and warm the copy: not measured
            engine.core.call(lambda source=source: drop_and_load(source))
            poll()
        for _ in range(args.loads):
            for source in sources:
                state["phase"] = "idle"
                poll(time.perf_counter() + args.idle_s)
                state["phase"] = source
                start = time.perf_counter()
                engine.core.call(lambda source=source: drop_and_load(source))
                poll()  # the loop keeps stepping meanwhile
                load_s[source].append(time.perf_counter() - start)
                windows.append((source, start, time.perf_counter()))
                state["phase"] = "between"
                time.sleep(0.3)
        for h in handles:
            h.cancel()
    # A step counts as during a load if it overlaps one (a load from the host often takes less
    # than a step); as idle if it lies in an idle phase.
    intervals = {"idle": [], **{source: [] for source in sources}}
    for i in range(1, len(ticks)):
        a, b = ticks[i - 1], ticks[i]
        overlapping = [src for src, start, end in windows if a < end and b > start]
        if overlapping:
            intervals[overlapping[0]].append(b - a)
        elif phase[i] == phase[i - 1] == "idle":
            intervals["idle"].append(b - a)
    idle = float(np.mean(intervals["idle"])) * 1e3
    payload = {
        "machine": machine(),
        "rows": args.rows,
        "xla_single_thread": args.xla_single_thread,
        "adapter_rank": args.rank,
        "adapter_file_mb": size_mb,
        "steps_idle": len(intervals["idle"]),
        "step_ms_idle": idle,
        "sources": {},
    }
    for source in sources:
        during = float(np.mean(intervals[source])) * 1e3 if intervals[source] else float("nan")
        payload["sources"][source] = {
            "load_s_mean": float(np.mean(load_s[source])),
            "load_s_median": float(np.median(load_s[source])),
            "steps_during_load": len(intervals[source]),
            "step_ms_during_load": during,
            "ratio": during / idle,
            "goal_met": during <= 1.2 * idle,
        }
        print(
            f"decode step ({args.rows} rows): idle {idle:.1f} ms over {len(intervals['idle'])} steps; loading from "
            f"{source}: {during:.1f} ms over {len(intervals[source])} steps (ratio {during / idle:.2f}); "
            f"{args.loads} loads of a {size_mb:.0f} MB rank-{args.rank} adapter, "
            f"{np.median(load_s[source]) * 1e3:.0f} ms median each",
            flush=True,
        )
    write_json(args.json, payload)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
