"""Start time and single-stream decode speed: `python -m benchmarks.model_start [--json OUT]`.

1. Ready to serve. `python -m serving.main` on the default model in a fresh process, timed from
   the process start to the first streamed token of a chat completion sent as soon as the port
   accepts connections (requests sent while the engine warms up wait for it):
   - `ready_first_s`: into an empty cache folder (parameter conversion, kernel build, every
     executable compiled); the model file itself is fetched before timing (download excluded);
   - `ready_cached_s`: the same command again, on the caches the first run left (the model's
     parameters, the kernel and every executable);
   - `ready_fresh_node_s`: the same command on a fresh node: an empty cache folder, and the
     shared compile cache (`--compile-cache`, a folder standing in for a network file system or
     an object store) the first run published to once its warm-up was done.
   Each run also reports when /health first answered 200 and the executables the plan holds.
2. Engine start through the Python API (`Engine.from_pretrained` until it can serve), first
   and cached, in fresh processes.
3. Single-stream greedy decoding on the same prompt, ours against transformers (torch, CPU,
   the same GGUF), `--new-tokens` tokens each, after a warm-up run. Both must produce the same
   tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

_START_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from plora_jax import Engine
engine = Engine.from_pretrained(sys.argv[1], cache_dir=sys.argv[2], dtype="float32", max_model_len=1024,
                                num_kv_blocks=256)
print(json.dumps({"ready_s": time.perf_counter() - t0, **engine.load_info, **engine.readiness()}))
engine.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _published(shared: str) -> bool:
    return all(list(Path(shared, kind).glob("*/manifest.json")) for kind in ("executables", "params", "kernels"))


def measure_server(
    model_path: str, cache_dir: str, shared: str, timeout_s: float = 900.0, log_level: str = "warning"
) -> dict:
    """Process start -> first streamed token through `python -m serving.main` (and /health 200);
    then, before stopping it, waits until the shared compile cache holds every kind of entry."""
    import httpx

    from serving.main import ServerConfig, served_name

    port = _free_port()
    command = [sys.executable, "-m", "serving.main", "--model", model_path, "--port", str(port)]
    command += ["--cache-dir", cache_dir, "--compile-cache", shared, "--log-level", log_level]
    env = {**os.environ, "PLORA_PROGRESS": "0"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:  # the port opens before the engine is warm; the request then waits for it
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited early: {proc.stderr.read()[-2000:]}")
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError("the server did not open its port")
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        port_s = time.perf_counter() - start
        body = {
            "model": served_name(ServerConfig(), model_path),  # a path is served by its file name
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "stream": True,
        }
        first_token_s = None
        with httpx.Client(timeout=timeout_s) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the first request got {r.status_code}: {r.read()[:500]!r}")
            for line in r.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]" or first_token_s is not None:
                    continue
                choices = json.loads(line[5:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):  # the first chunk carries only the role
                    first_token_s = time.perf_counter() - start
        health_s = None
        while health_s is None:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                health_s = time.perf_counter() - start
        health = httpx.get(url + "/health", timeout=5).json()
        deadline = time.perf_counter() + timeout_s
        while not _published(shared) and time.perf_counter() < deadline:  # warm-up done, then published
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(60)
    return {"port_s": port_s, "first_token_s": first_token_s, "health_200_by_s": health_s, **health}


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
    engine.wait_warm()
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate([ids], sp)  # warm
    t0 = time.perf_counter()
    ours = engine.generate([ids], sp)[0]
    ours_s = time.perf_counter() - t0
    engine.close()

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
        "same_tokens": ours.token_ids == ref[0, len(ids) :].tolist(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-api", action="store_true", help="skip the Engine.from_pretrained starts")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    from benchmarks.common import machine, write_json
    from plora_jax.models.registry import resolve_model

    model_path = resolve_model(args.model)  # download (if any) happens here, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        server_cache, fresh_cache, api_cache, shared = (str(Path(tmp, n)) for n in ("node", "fresh", "api", "shared"))
        first_server = measure_server(str(model_path), server_cache, shared)
        cached_server = measure_server(str(model_path), server_cache, shared)
        fresh_server = measure_server(str(model_path), fresh_cache, shared)
        first = cached = None
        if not args.skip_api:
            first = measure_start(str(model_path), api_cache)
            cached = measure_start(str(model_path), api_cache)
            assert not first["from_cache"] and cached["from_cache"]
    decode = None if args.skip_decode else measure_decode(Path(model_path), args.new_tokens)
    result = {
        "model": str(Path(model_path).name),
        "machine": machine(),
        "ready_first_s": first_server["first_token_s"],
        "ready_cached_s": cached_server["first_token_s"],
        "ready_fresh_node_s": fresh_server["first_token_s"],
        "executables": cached_server["total"],
        "server": {"first": first_server, "cached": cached_server, "fresh_node": fresh_server},
        "api_start": first
        and {
            "first_load_s": first["load_seconds"],
            "first_process_s": first["process_s"],
            "cached_load_s": cached["load_seconds"],
            "cached_process_s": cached["process_s"],
        },
        "decode": decode,
        "goals": {
            "ready_fresh_node_le_8s": fresh_server["first_token_s"] <= 8,
            "ready_cached_le_8s": cached_server["first_token_s"] <= 8,
            "ready_first_le_30s": first_server["first_token_s"] <= 30,
        },
    }
    print(f"machine: {result['machine']}")
    runs = (("first (empty caches)", first_server), ("cached", cached_server), ("fresh node", fresh_server))
    for name, run in runs:
        print(
            f"serving.main {name:21s}: port open {run['port_s']:.1f}s, first token {run['first_token_s']:.1f}s, "
            f"/health 200 by {run['health_200_by_s']:.1f}s ({run['compiled']}/{run['total']} executables built)",
            flush=True,
        )
    s = result["api_start"]
    if s:
        print(f"Engine.from_pretrained first: load {s['first_load_s']:.2f}s, process {s['first_process_s']:.1f}s")
        print(f"Engine.from_pretrained cached: load {s['cached_load_s']:.2f}s, process {s['cached_process_s']:.1f}s")
    if decode:
        print(
            f"decode single stream, {decode['new_tokens']} greedy tokens after a {decode['prompt_tokens']}-token "
            f"prompt: ours {decode['ours_tok_s']:.1f} tok/s, transformers {decode['hf_tok_s']:.1f} tok/s -> "
            f"{decode['speedup']:.2f}x (same tokens: {decode['same_tokens']})"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
