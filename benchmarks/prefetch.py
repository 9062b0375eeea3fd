"""Decode step time with and without a concurrent adapter load: `python -m benchmarks.prefetch [--json OUT]`.

One engine on the real model decodes `--rows` greedy requests. The step time is the mean
interval between consecutive tokens of one running request (every step yields one token per
decode row). It is measured first with no adapter traffic, then while adapters load from disk
(the host copy is dropped first, so each load reads and lays out the PEFT file, stages it on the
device on the transfer thread, and the loop commits it at a step boundary). Both phases run in
the same process, alternating (idle, load, idle, load, ...). Goal (issue 5): step_ms_during_load <= 1.2 x step_ms_idle.
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
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--idle-s", type=float, default=1.5, help="idle seconds before each load")
    parser.add_argument(
        "--xla-single-thread",
        action="store_true",
        help="run XLA's CPU computations on one thread, leaving the other cores to the transfer thread "
        "(as on a GPU host, where the step does not run on the CPU); must come before jax is imported",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
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
        load_s = []

        manager = engine.core.lora

        def drop_and_load():
            manager.apply(Decision(evict=["a"]))
            manager.drop_host_copy("a")  # force a disk read
            manager.start_load("a")

        # Idle and loading phases alternate, so that drift of the machine's speed hits both alike.
        for _ in range(args.loads):
            state["phase"] = "idle"
            time.sleep(args.idle_s)
            state["phase"] = "load"
            start = time.perf_counter()
            engine.core.call(drop_and_load)
            while engine.stats()["adapters_loading"]:  # the loop keeps stepping meanwhile
                time.sleep(0.005)
            load_s.append(time.perf_counter() - start)
            state["phase"] = "between"  # the step that straddles the end of the load counts for neither
            time.sleep(0.3)
        for h in handles:
            h.cancel()
    intervals = {"idle": [], "load": []}
    for i in range(1, len(ticks)):
        if phase[i] == phase[i - 1] and phase[i] in intervals:
            intervals[phase[i]].append(ticks[i] - ticks[i - 1])
    idle = float(np.mean(intervals["idle"])) * 1e3
    during = float(np.mean(intervals["load"])) * 1e3
    payload = {
        "machine": machine(),
        "rows": args.rows,
        "xla_single_thread": args.xla_single_thread,
        "adapter_rank": args.rank,
        "adapter_file_mb": size_mb,
        "load_s_mean": float(np.mean(load_s)),
        "steps_idle": len(intervals["idle"]),
        "steps_during_load": len(intervals["load"]),
        "step_ms_idle": idle,
        "step_ms_during_load": during,
        "ratio": during / idle,
        "goal_met": during <= 1.2 * idle,
    }
    write_json(args.json, payload)
    print(
        f"decode step ({args.rows} rows): idle {idle:.1f} ms over {len(intervals['idle'])} steps, "
        f"during loads {during:.1f} ms over {len(intervals['load'])} steps (ratio {during / idle:.2f}); "
        f"{args.loads} loads of a {size_mb:.0f} MB rank-{args.rank} adapter, {np.mean(load_s):.2f} s each",
        flush=True,
    )
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
