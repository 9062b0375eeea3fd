"""A measured cost profile at a real model's shapes with random weights, for the simulator:
`python -m benchmarks.gpu_profile [--preset llama3_8b] [--json OUT]`.

The profile on paper (`plora_jax.serverless.sim.profiles`) stands in for a GPU until one is
lent; this writes the measured one the day it is. One engine is built from random weights at
`--preset` (speed does not depend on weight values) with a LoRA pool, `--adapters` random
adapters of mixed ranks are written and registered, and `plora_jax.serverless.live.calibrate`
fits the step terms to the engine's recorded steps (decode and prefill at several sizes, with
and without adapters). Loads are then timed per source: each adapter is copied from the host
cache, then read from its folder (host copy dropped), and the transfer's own time per byte
gives the host-to-device and disk rates. The JSON is a calibration `benchmarks.replay --mode
sim --calibration OUT` reads. `--preset tiny` runs the same on a CPU in seconds (CI does,
through `benchmarks/gpu.sh --cpu-check`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 12, 16, 24, 40, 64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3_8b", choices=["llama3_8b", "smollm2_135m", "tiny"])
    parser.add_argument("--rows", type=int, default=32, help="decode rows of the engine")
    parser.add_argument("--adapters", type=int, default=6, help="random adapters, ranks cycling through the mix")
    parser.add_argument("--json", help="write the calibration here")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from benchmarks.common import machine, write_json
    from benchmarks.gpu_throughput import random_params
    from plora_jax import Engine, config
    from plora_jax.lora.peft import save_random_adapter
    from plora_jax.policies import Decision, make_policy
    from plora_jax.serverless.live import calibrate, transfer_rates

    model_config = getattr(config, args.preset)()
    model_config = dataclasses.replace(
        model_config, max_position_embeddings=max(model_config.max_position_embeddings, 2048)
    )
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    started = time.perf_counter()
    engine = Engine.from_params(
        model_config,
        random_params(model_config, jax.numpy.dtype(dtype)),
        dtype=dtype,
        max_model_len=1024,
        num_kv_blocks=args.rows * 64 + 8,
        max_num_seqs=args.rows,
        max_loras=args.adapters,
        max_lora_rank=max(RANKS),
        lora_pool_pages=sum(-(-r // 8) for r in RANKS) * (-(-args.adapters // len(RANKS))) + 1,
        policy="lru",
    )
    engine.wait_warm()
    start_s = time.perf_counter() - started
    print(f"machine: {machine()}; {args.preset} engine warm in {start_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="plora-gpu-profile-") as tmp:
        ranks = [RANKS[i % len(RANKS)] for i in range(args.adapters)]
        for i, rank in enumerate(ranks):
            engine.add_adapter(f"a{i}", save_random_adapter(Path(tmp) / f"a{i}", model_config, rank, TARGETS, seed=i))
        cal = calibrate(engine, start_s)  # the step terms
        # Loads per source, from the transfer's own time: every adapter from the host cache, then
        # from its folder. `reset_adapters` empties the pool; the host copies are read again.
        engine.set_policy(make_policy("lru"))
        manager = engine.core.lora
        names = [f"a{i}" for i in range(args.adapters)]
        for source in ("host", "disk"):
            engine.reset_adapters()
            if source == "host":
                engine.generate([[1, 2, 3]] * len(names), adapters=names)  # reads them into the host cache
                engine.core.call(lambda: manager.apply(Decision(evict=names)))
            for name in names:

                def load(name=name, source=source):
                    if source == "disk":
                        manager.drop_host_copy(name)
                    manager.start_load(name)

                engine.core.call(load)
                engine.core.call(lambda name=name: engine.core.wait_for_adapter(name))
        stats = engine.stats()
        h2d, disk = transfer_rates(
            *(stats[f"adapter_transfer_{what}_from_{tier}"] for tier in ("host", "disk") for what in ("s", "bytes"))
        )
    engine.close()
    cal = dataclasses.replace(
        cal, h2d_bytes_per_s=h2d, disk_bytes_per_s=disk, source=f"measured: {args.preset}, random weights, {machine()}"
    )
    payload = {"machine": machine(), "preset": args.preset, "calibration": cal.to_dict()}
    write_json(args.json, payload)
    one = cal.load_s(int(np.mean(ranks)) * cal.bytes_per_rank, on_host=True)
    print(
        f"decode base {cal.decode_base_s * 1e3:.2f} ms + {cal.decode_row_s * 1e3:.3f} ms/row; prefill "
        f"{cal.prefill_token_s * 1e6:.1f} us/token; host-to-device {h2d / 1e9:.1f} GB/s, disk {disk / 1e9:.2f} GB/s; "
        f"a mean-rank load from the host {one * 1e3:.1f} ms; fit error {cal.fit_error:.1%} over {cal.fit_steps} steps",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
