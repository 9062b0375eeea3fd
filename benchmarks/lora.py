"""Multi-LoRA step times and adapter memory utilisation: `python -m benchmarks.lora [--json OUT]`.

Steps. On the real model, one engine per layout: no LoRA (`max_loras=0`: no LoRA code in the
step), `paged`, and `contiguous` (fixed slots padded to the maximum rank, the vLLM design: its
slots hold and compute `max_lora_rank` rows). Adapters of mixed ranks (cycling through
`--ranks`) are resident; a decode step (`--rows` rows, one token each, context `--context`)
and a prefill step (`--rows` rows of `--prefill-tokens` tokens) are timed with 0, 1, 8 and 32
distinct adapters among the rows (median of `--repeats` runs after one untimed run).

Memory. For each layout, the adapter pool of the same byte budget serves a churn run in which
more adapters are demanded than fit: `--churn-adapters` adapters with ranks drawn from
`--ranks`, requests for them in Zipf popularity, each holding (pinning) its adapter for a random
number of ticks, loads and LRU evictions through the engine's own allocator and donated commits.
Utilisation is `plora_jax.metrics.adapter_mem_util` (bytes of resident adapter weights at their
true rank / device bytes reserved for them), averaged over request ticks from the first eviction
on (a filling pool measures nothing); beside it the pool's fill (reserved / pool bytes) and the
live bytes over the pool's bytes, which say how much adapter weight each layout fits in the
same pool.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from .common import machine, write_json


def make_adapters(root: Path, model_config, ranks: list[int], targets: tuple[str, ...], seed: int) -> list[Path]:
    from plora_jax.lora.peft import save_random_adapter

    return [
        save_random_adapter(
            root / f"a{i:03d}_r{r}", model_config, r, targets, seed=seed + i, scale=0.02, dtype=np.float16
        )
        for i, r in enumerate(ranks)
    ]


def _time(fn, repeats: int) -> float:
    fn()  # compile and warm
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def step_times(
    engine, slots_by_adapter: list[int], distinct: int, rows: int, context: int, prefill_tokens: int, repeats: int
):
    """(decode_s, prefill_s) of one step with `distinct` adapters spread over the rows, through
    the runner's public steps (the engine is not started: this thread owns it)."""
    import jax

    from plora_jax import SamplingParams
    from plora_jax.engine.scheduler import DecodeRow, PrefillRow, Request

    runner = engine.runner
    bs = runner.block_size
    per_row = -(-max(context + 1, prefill_tokens) // bs)
    requests = []
    for r in range(rows):
        request = Request(f"bench{r}", [7] * context, SamplingParams(temperature=0), 0, frozenset(), context + 1)
        request.blocks = list(range(1 + r * per_row, 1 + (r + 1) * per_row))
        request.seq_slot = r
        request.adapter_slot = slots_by_adapter[r % distinct] if distinct else 0
        requests.append(request)
    decode_rows = [DecodeRow(req, position=context, step=0) for req in requests]
    prefill_rows = [PrefillRow(req, 0, [7] * prefill_tokens, True, 0) for req in requests]
    decode_s = _time(lambda: jax.block_until_ready(runner.decode(decode_rows).tokens), repeats)
    prefill_s = _time(lambda: jax.block_until_ready(runner.prefill(prefill_rows).tokens), repeats)
    return decode_s, prefill_s


def run_steps(args, adapters: list[Path]) -> list[dict]:
    from plora_jax import Engine

    rows, results = args.rows, []
    blocks = rows * (-(-max(args.context + 1, args.prefill_tokens) // 16)) + 2
    common = dict(
        warmup=False,
        start=False,  # this thread drives the engine's runner directly
        max_num_seqs=rows,
        max_prefill_seqs=rows,  # the prefill step packs one chunk of every row
        max_num_batched_tokens=rows * args.prefill_tokens,
        num_kv_blocks=blocks,
        max_model_len=max(args.context + 1, args.prefill_tokens) + 16,
        max_lora_rank=max(args.ranks),
        page_rows=args.page_rows,
        lora_target_modules=args.target_modules,
        lora_implementation=args.implementation,
    )
    for layout in ("none", "paged", "contiguous"):
        if layout == "none":
            engine = Engine.from_pretrained(args.model, max_loras=0, **common)
        else:
            pages = (max(args.distinct) * -(-max(args.ranks) // args.page_rows)) + 1
            engine = Engine.from_pretrained(
                args.model, max_loras=max(args.distinct), lora_pool_pages=pages, layout=layout, **common
            )
        slots = []
        lora = engine.core.lora
        if lora is not None:
            for i, path in enumerate(adapters[: max(args.distinct)]):
                name = f"s{i}"
                engine.add_adapter(name, path)
                if lora.acquire(name) is None:  # starts the load: wait for it, then pin
                    engine.core.wait_for_adapter(name)
                    slot = lora.acquire(name, first=False)
                    assert slot is not None, f"{name} did not load"
                slots.append(lora.pages.get(name).slot)
        for distinct in args.distinct:
            if layout == "none" and distinct:
                continue
            decode_s, prefill_s = step_times(
                engine, slots, distinct, rows, args.context, args.prefill_tokens, args.repeats
            )
            row = {
                "layout": layout,
                "distinct_adapters": distinct,
                "decode_step_s": decode_s,
                "prefill_step_s": prefill_s,
            }
            results.append(row)
            print(
                f"  {layout:10s} {distinct:3d} adapters: decode {decode_s * 1e3:8.1f} ms   "
                f"prefill ({rows}x{args.prefill_tokens}) {prefill_s * 1e3:8.1f} ms",
                flush=True,
            )
        engine.close()
    base = next(r for r in results if r["layout"] == "none")
    for r in results:
        r["decode_vs_no_lora"] = r["decode_step_s"] / base["decode_step_s"]
        r["prefill_vs_no_lora"] = r["prefill_step_s"] / base["prefill_step_s"]
    return results


def run_churn(args, model_config, adapters: list[Path], ranks: list[int], layout: str) -> dict:
    """Time-averaged adapter memory utilisation of one layout under churn (see module docstring)."""
    from plora_jax.config import EngineConfig
    from plora_jax.lora.manager import LoraManager

    config = EngineConfig(
        max_loras=len(adapters),
        max_lora_rank=max(args.ranks),
        page_rows=args.page_rows,
        lora_pool_mb=args.pool_mb,
        layout=layout,
        lora_target_modules=args.target_modules,
    )
    manager = LoraManager(model_config, config, np.dtype(args.churn_dtype))
    for i, path in enumerate(adapters):
        manager.add(f"c{i}", path)
    pool = manager.zeros()
    rng = np.random.default_rng(args.seed)
    popularity = 1.0 / np.arange(1, len(adapters) + 1) ** args.zipf
    popularity /= popularity.sum()
    order = rng.permutation(len(adapters))  # popularity rank -> adapter, independent of rank
    queue: deque[str] = deque()
    holding: list[tuple[int, str]] = []  # (release tick, adapter)
    samples, fills, live_over_pool, waits, started = [], [], [], 0, False
    start = time.perf_counter()
    for tick in range(args.churn_requests):
        for release, name in [h for h in holding if h[0] <= tick]:
            manager.release(name)
            holding.remove((release, name))
        queue.append(f"c{order[rng.choice(len(adapters), p=popularity)]}")
        while queue:
            slot = manager.acquire(queue[0])
            if slot is None and manager.is_loading(queue[0]):  # the churn measures memory, not time:
                pool, _ = manager.wait_for(queue[0], pool)  # let the load finish at once
                slot = manager.acquire(queue[0], first=False)
            if slot is None:
                waits += 1
                break
            holding.append((tick + int(rng.integers(1, 2 * args.hold + 1)), queue.popleft()))
        started = started or manager.pages.evictions > 0
        if started:
            stats = manager.stats()
            samples.append(stats["adapter_mem_util"])
            fills.append(stats["adapter_pool_fill"])
            live_over_pool.append(stats["adapter_live_bytes"] / stats["adapter_pool_bytes"])
    elapsed = time.perf_counter() - start
    return {
        "layout": layout,
        "util_time_avg": float(np.mean(samples)) if samples else 0.0,
        "util_min": float(np.min(samples)) if samples else 0.0,
        "pool_fill_time_avg": float(np.mean(fills)) if fills else 0.0,
        "live_over_pool_time_avg": float(np.mean(live_over_pool)) if live_over_pool else 0.0,
        "ticks_measured": len(samples),
        "pool_pages": manager.num_pages,
        "pool_mb": manager.pool_bytes / 2**20,
        "loads": manager.pages.loads,
        "evictions": manager.pages.evictions,
        "blocked_ticks": waits,
        "load_s_mean": manager.load_seconds_total / max(manager.pages.loads, 1),
        "wall_s": elapsed,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--distinct", type=int, nargs="+", default=[0, 1, 8, 32])
    parser.add_argument("--rows", type=int, default=32, help="rows of the timed decode and prefill steps")
    parser.add_argument("--context", type=int, default=128, help="context length of the decode rows")
    parser.add_argument("--prefill-tokens", type=int, default=16, help="tokens per prefill row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--page-rows", type=int, default=8)
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--churn-adapters", type=int, default=48)
    parser.add_argument("--churn-requests", type=int, default=600)
    parser.add_argument(
        "--churn-dtype", default="float32", help="pool dtype of the churn run (the ratio is dtype-free)"
    )
    parser.add_argument("--pool-mb", type=float, default=512.0, help="adapter pool budget of the churn run")
    parser.add_argument("--hold", type=int, default=3, help="mean ticks a request pins its adapter")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import ml_dtypes  # noqa: F401  (bfloat16 as a numpy dtype)

    from plora_jax.models.loader import load_model

    print(f"machine: {machine()}", flush=True)
    model_config = load_model(args.model, np.float32).config
    targets = tuple(args.target_modules.split(","))
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="plora-bench-") as tmp:
        root = Path(tmp)
        step_ranks = [args.ranks[i % len(args.ranks)] for i in range(max(args.distinct))]
        churn_ranks = [int(r) for r in rng.choice(args.ranks, size=args.churn_adapters)]
        print(f"writing {len(step_ranks) + len(churn_ranks)} PEFT adapters ...", flush=True)
        step_adapters = make_adapters(root / "steps", model_config, step_ranks, targets, 1000)
        churn_adapters = make_adapters(root / "churn", model_config, churn_ranks, targets, 2000)
        memory = {}
        for layout in ("paged", "contiguous"):
            memory[layout] = run_churn(args, model_config, churn_adapters, churn_ranks, layout)
            m = memory[layout]
            print(
                f"memory {layout:10s}: util {m['util_time_avg']:.4f} (min {m['util_min']:.4f}), pool fill "
                f"{m['pool_fill_time_avg']:.4f}, live/pool {m['live_over_pool_time_avg']:.4f} over "
                f"{m['ticks_measured']} ticks, {m['loads']} loads, {m['evictions']} evictions, "
                f"{m['blocked_ticks']} blocked ticks, pool {m['pool_pages']} pages / {m['pool_mb']:.0f} MB",
                flush=True,
            )
        steps = [] if args.skip_steps else run_steps(args, step_adapters)
    payload = {
        "machine": machine(),
        "model": args.model,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "memory": {layout: memory[layout]["util_time_avg"] for layout in memory},
        "memory_detail": memory,
        "steps": steps,
        "goal_paged_util_ge_0_97": memory["paged"]["util_time_avg"] >= 0.97,
    }
    write_json(args.json, payload)
    print(
        f"adapter memory utilisation: paged {payload['memory']['paged']:.4f}, "
        f"contiguous {payload['memory']['contiguous']:.4f} "
        f"(paged / contiguous = {payload['memory']['paged'] / max(payload['memory']['contiguous'], 1e-9):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
