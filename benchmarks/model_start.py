"""Model start and single-stream decode speed: `python -m benchmarks.model_start [--json OUT]`.

1. Start time of `Engine.from_pretrained` on the default model, each start in a fresh Python
   process: first start into an empty parameter cache (GGUF parse, dequantize, convert, save;
   the download is excluded: the GGUF is fetched before timing) against a cached start (orbax
   restore). Process wall time to a ready engine is reported next to the load phase.
2. Single-stream greedy decoding on the same prompt, ours against transformers (torch, CPU,
   the same GGUF), `--new-tokens` tokens each, after a warm-up run (our compile time is
   reported separately). Both must produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

_START_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from plora_jax import Engine
engine = Engine.from_pretrained(sys.argv[1], cache_dir=sys.argv[2], dtype="float32", max_model_len=1024,
                                num_kv_blocks=256)
print(json.dumps({"ready_s": time.perf_counter() - t0, **engine.load_info}))
"""


def measure_start(model_path: str, cache_dir: str) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _START_SCRIPT, model_path, cache_dir], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def measure_decode(model_path, new_tokens: int) -> dict:
    import torch
    import transformers

    from plora_jax import Engine, SamplingParams

    engine = Engine.from_pretrained(str(model_path), dtype="float32", max_model_len=1024, num_kv_blocks=256)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([ids], sp)  # compiles prefill and decode
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = engine.generate([ids], sp)[0]
    ours_s = time.perf_counter() - t0

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    inputs = torch.tensor([ids])
    with torch.no_grad():
        hf.generate(inputs, max_new_tokens=8, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        ref = hf.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        hf_s = time.perf_counter() - t0
    return {
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "ours_tok_s": new_tokens / ours_s,
        "hf_tok_s": new_tokens / hf_s,
        "speedup": hf_s / ours_s,
        "ours_compile_s": compile_s - ours_s,
        "same_tokens": ours.token_ids == ref[0, len(ids) :].tolist(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    from benchmarks.common import machine, write_json
    from plora_jax.models.registry import resolve_model

    model_path = resolve_model(args.model)  # download (if any) happens here, outside the timings
    with tempfile.TemporaryDirectory() as cache:
        first = measure_start(str(model_path), cache)
        cached = measure_start(str(model_path), cache)
    assert not first["from_cache"] and cached["from_cache"]
    decode = measure_decode(model_path, args.new_tokens)
    result = {
        "model": str(model_path.name),
        "machine": machine(),
        "start": {
            "first_load_s": first["load_seconds"],
            "first_process_s": first["process_s"],
            "cached_load_s": cached["load_seconds"],
            "cached_process_s": cached["process_s"],
            "load_speedup": first["load_seconds"] / cached["load_seconds"],
        },
        "decode": decode,
    }
    s, d = result["start"], decode
    print(f"machine: {result['machine']}")
    print(f"start  first (convert): load {s['first_load_s']:.2f}s, process to ready {s['first_process_s']:.2f}s")
    print(
        f"start  cached (orbax):  load {s['cached_load_s']:.2f}s, process to ready {s['cached_process_s']:.2f}s"
        f"  -> load {s['load_speedup']:.1f}x faster"
    )
    print(
        f"decode single stream, {d['new_tokens']} greedy tokens after a {d['prompt_tokens']}-token prompt: "
        f"ours {d['ours_tok_s']:.1f} tok/s, transformers {d['hf_tok_s']:.1f} tok/s -> {d['speedup']:.2f}x "
        f"(our compile {d['ours_compile_s']:.1f}s; same tokens: {d['same_tokens']})"
    )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
