"""Throughput at a real model's shapes with random weights, ours against transformers on the same
device: `python -m benchmarks.gpu_throughput [--preset llama3_8b] [--json OUT]`.

Meant for an accelerator (the preset defaults to Llama-3.1-8B: speed does not depend on weight
values, and no model file has to travel); `--preset tiny` runs the same code on a CPU in
seconds (CI checks it there). Both engines get the same random prompts of `--prompt-tokens`
tokens and generate exactly `--max-tokens` tokens each (EOS ignored), C requests at a time:

- ours: a closed loop of C clients over `Engine.from_params` (bfloat16 on accelerators);
- transformers: `LlamaForCausalLM` built from the same shapes (random init, same dtype) on the
  same device, `generate` on batches of C, one after another.

Also reported: our decode step at `--step-rows` rows and `--step-context` tokens beside its
weight matmuls alone (the same measurement as `benchmarks.throughput`).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import run_clients


def random_params(config, dtype, seed: int = 0):
    """Random parameters built on the default device (no host copy of 16 GB for an 8B model)."""
    import jax
    import jax.numpy as jnp

    from plora_jax.models.llama import param_shapes

    shapes = param_shapes(config, dtype)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for key, (path, leaf) in zip(keys, leaves, strict=True):
        if "norm" in jax.tree_util.keystr(path):
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            out.append((jax.random.normal(key, leaf.shape, jnp.float32) * 0.02).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def run_ours(engine, prompts, max_tokens: int, concurrency: int) -> dict:
    import threading

    from plora_jax import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    pending = list(prompts)
    lock = threading.Lock()
    outputs = []

    def client():
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            out = engine.submit(prompt, sp).result()
            with lock:
                outputs.append(out)

    seconds = run_clients(client, concurrency)
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def run_hf(model, prompts, max_tokens: int, concurrency: int, device) -> dict:
    import torch

    start = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for b in range(0, len(prompts), concurrency):
            batch = torch.tensor(prompts[b : b + concurrency], device=device)
            out = model.generate(
                batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
            tokens += (out.shape[1] - batch.shape[1]) * out.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def hf_model(config, dtype_name: str, device):
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).to(dtype)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3_8b", choices=["llama3_8b", "smollm2_135m", "tiny"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--step-rows", type=int, default=32)
    parser.add_argument("--step-context", type=int, default=512)
    parser.add_argument("--skip-hf", action="store_true", help="ours only (no transformers baseline)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import dataclasses

    import jax
    import numpy as np

    from benchmarks.common import machine, write_json
    from benchmarks.throughput import decode_step_vs_matmuls
    from plora_jax import Engine, config

    model_config = getattr(config, args.preset)()
    max_len = args.prompt_tokens + args.max_tokens + 16
    model_config = dataclasses.replace(model_config, max_position_embeddings=max(max_len, 1024))
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    rows = max(max(args.concurrency), args.step_rows)
    blocks = rows * (-(-max(max_len, args.step_context + 1) // 16)) + 8
    engine = Engine.from_params(
        model_config,
        random_params(model_config, jax.numpy.dtype(dtype)),
        dtype=dtype,
        max_model_len=max(max_len, args.step_context + 16),
        num_kv_blocks=blocks,
        max_num_seqs=rows,
        max_loras=0,
    )
    engine.wait_warm()
    stats = engine.stats()
    rng = np.random.default_rng(0)
    device = None
    if not args.skip_hf:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hf = hf_model(model_config, dtype, device)
    results = []
    for c in args.concurrency:
        prompts = rng.integers(1, model_config.vocab_size, size=(c * args.requests_per_client, args.prompt_tokens))
        prompts = prompts.tolist()
        run_ours(engine, prompts[:c], 2, c)  # warm the shapes of this load
        ours = run_ours(engine, prompts, args.max_tokens, c)
        row = {"concurrency": c, "ours_tok_s": ours["tok_s"], "ours_tokens": ours["tokens"]}
        if not args.skip_hf:
            run_hf(hf, prompts[:c], 2, c, device)
            ref = run_hf(hf, prompts, args.max_tokens, c, device)
            row |= {"hf_tok_s": ref["tok_s"], "speedup": ours["tok_s"] / ref["tok_s"]}
        results.append(row)
        ratio = f" | transformers {row['hf_tok_s']:8.1f} tok/s -> {row['speedup']:.2f}x" if "speedup" in row else ""
        print(f"concurrency {c:3d}: ours {row['ours_tok_s']:8.1f} tok/s{ratio}", flush=True)
    engine.close()
    step = decode_step_vs_matmuls(engine.runner, args.step_rows, args.step_context, 10)
    print(
        f"decode step, {args.step_rows} rows at context {args.step_context}: {step['step_s'] * 1e3:.2f} ms; "
        f"weight matmuls alone {step['matmuls_s'] * 1e3:.2f} ms -> {step['ratio']:.2f}x",
        flush=True,
    )
    payload = {
        "machine": machine(),
        "preset": args.preset,
        "dtype": dtype,
        "rows": results,
        "decode_step": step,
        "attention_implementation": stats["attention_implementation"],
        "lora_implementation": stats["lora_implementation"],
        "executables": stats["executables"],
        "warmup_s": stats["compile_s"] + stats["load_s"],
    }
    write_json(args.json, payload)
    print(f"machine: {payload['machine']}; attention {payload['attention_implementation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
