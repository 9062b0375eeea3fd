"""The engine's adapter load path against a raw device_put of the same bytes:
`python -m benchmarks.load_path [--ranks 8,16,32,64,128] [--json OUT]`.

For each rank, a random PEFT adapter on the model's shapes (every projection, float32) is
written to disk, then, in one run on one engine (driven on this thread, no loop thread):
- **engine**: `Engine.prefetch` from the host cache until the copy is committed to the pool
  (`wait_for_adapter`) and the pool's arrays are ready (the donated write has run); the best
  of `--repeats` loads (each after `reset_adapters`, the host copy put back by reading the
  folder again);
- **raw**: `jax.device_put` of the same page arrays and `block_until_ready`, best of
  `--repeats` (on a GPU, from page-locked host memory: the arrays are put in `pinned_host`
  first, untimed). On CPU the host pages are 64-byte aligned, so this shares their buffers and
  copies nothing; `memcpy` (one host copy of the bytes) is printed beside it as the floor for
  any path that writes the bytes into a pool;
- **split**: the same work timed piece by piece through the library's public functions:
  `read` (`peft.read_adapter`: open, parse, read and check the tensors), `layout`
  (`peft.layout_pages`), `transfer` (the raw device_put), and `commit` (the engine's load less
  the raw transfer: padding to the commit bucket, the copy, and the donated write into the pool).

Rows: `{"rank", "bytes", "engine_bytes_per_s", "raw_bytes_per_s", "engine_over_raw", "split_s"}`.
The goal (issue 36) is engine/raw >= 0.8 at every rank.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(ranks: list[int], repeats: int, folder: Path, preset: str = "smollm2_135m") -> list[dict]:
    import jax.numpy as jnp

    from plora_jax import Engine
    from plora_jax import config as presets
    from plora_jax.models.llama import init_params

    config = getattr(presets, preset)()
    params = init_params(config, jnp.float32, seed=0, scale=0.02)
    max_rank = max(ranks)
    engine = Engine.from_params(
        config, params, start=False, warmup=False, max_model_len=256, num_kv_blocks=32, max_loras=2,
        max_lora_rank=max_rank, lora_pool_pages=2 * -(-max_rank // 8) + 2, host_cache_mb=4096, dtype="float32",
    )  # fmt: skip
    try:
        return [_row(engine, config, rank, folder, repeats) for rank in ranks]
    finally:
        engine.close()


def _row(engine, config, rank: int, folder: Path, repeats: int) -> dict:
    import jax

    from plora_jax.lora.peft import TARGET_MODULES, layout_pages, read_adapter, save_random_adapter

    name = f"r{rank}"
    path = save_random_adapter(folder / name, config, rank, TARGET_MODULES, seed=rank, scale=0.02)
    loads, moved = [], 0
    for _ in range(repeats):
        engine.add_adapter(name, path)  # read and laid out into the host cache (timed in the split)
        before = engine.stats(fresh=True)
        jax.block_until_ready(engine.runner.state.lora)
        t0 = time.perf_counter()
        engine.prefetch(name)
        engine.core.wait_for_adapter(name)
        jax.block_until_ready(engine.runner.state.lora)  # the commit's write into the pool has run
        loads.append(time.perf_counter() - t0)
        after = engine.stats(fresh=True)
        moved = after["adapter_transfer_bytes_from_host"] - before["adapter_transfer_bytes_from_host"]
        engine.reset_adapters()  # off the device, host cache emptied
        engine.remove_adapter(name)
    engine_s = min(loads)
    max_rank = engine.config.max_lora_rank
    rows = engine.config.page_rows
    adapter = read_adapter(name, path, config, max_rank, TARGET_MODULES)[1]
    read_s = _best(lambda: read_adapter(name, path, config, max_rank, TARGET_MODULES), repeats)
    layout_s = _best(lambda: layout_pages(adapter, config, rows, np.float32, TARGET_MODULES), repeats)
    a_pages, b_pages, _ = layout_pages(adapter, config, rows, np.float32, TARGET_MODULES)
    arrays = [*a_pages.values(), *b_pages.values()]
    nbytes = sum(a.nbytes for a in arrays)
    device = jax.devices()[0]
    if device.platform == "gpu":  # the raw figure on a GPU: a DMA from page-locked host memory
        pinned = jax.device_put(arrays, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
        raw_s = _best(lambda: jax.block_until_ready(jax.device_put(pinned, device)), repeats)
    else:
        raw_s = _best(lambda: jax.block_until_ready(jax.device_put(arrays)), repeats)
    targets = [np.empty_like(a) for a in arrays]
    for target, a in zip(targets, arrays, strict=True):
        np.copyto(target, a)  # touched once: the timed copies below write memory already mapped
    copy_s = _best(lambda: [np.copyto(t, a) for t, a in zip(targets, arrays, strict=True)], repeats)
    split = {"read": read_s, "layout": layout_s, "transfer": raw_s, "commit": max(0.0, engine_s - raw_s)}
    return {
        "rank": rank,
        "bytes": nbytes,
        "engine_bytes_moved": moved,
        "engine_bytes_per_s": nbytes / engine_s,
        "raw_bytes_per_s": nbytes / raw_s,
        "engine_over_raw": raw_s / engine_s,
        "memcpy_bytes_per_s": nbytes / copy_s,
        "engine_over_memcpy": copy_s / engine_s,
        "split_s": split | {"engine_load": engine_s},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="smollm2_135m", choices=["smollm2_135m", "llama3_8b", "tiny"])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    from benchmarks.common import machine, write_json

    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(ranks, args.repeats, Path(tmp), args.preset)
    print(f"machine: {machine()}")
    print(f"{'rank':>5} {'MB':>7} {'engine GB/s':>12} {'raw GB/s':>9} {'engine/raw':>10} {'/memcpy':>8}   split (ms)")
    for r in rows:
        split = "  ".join(f"{k} {v * 1e3:.1f}" for k, v in r["split_s"].items())
        print(
            f"{r['rank']:>5} {r['bytes'] / 1e6:>7.1f} {r['engine_bytes_per_s'] / 1e9:>12.2f} "
            f"{r['raw_bytes_per_s'] / 1e9:>9.2f} {r['engine_over_raw']:>10.2f} "
            f"{r['engine_over_memcpy']:>8.2f}   {split}"
        )
    write_json(args.json, {"machine": machine(), "model": f"{args.preset} shapes", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
