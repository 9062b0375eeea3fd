"""Load on the live server: `python -m benchmarks.serve_load [--json OUT]`.

Starts `python -m serving.main` as a separate process on a free local port (the default model,
warm-up on, `--adapters` random PEFT adapters of mixed ranks registered with --adapter-dir),
waits for /health, then for each concurrency C in `--concurrency` runs C closed-loop streaming
clients (the official `openai` AsyncOpenAI client) for `--requests-per-client` requests each,
spread round-robin over the base model and the adapters. Reported per C: requests/s, output
tokens/s, TTFT p50/p99 (first content chunk as the client sees it) and end-to-end p50, all
measured in this one run against the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import machine, write_json

PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of Italy?",
    "Give me a short tip for learning to cook.",
    "Name three fruits.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model: str, adapter_dir: Path, flags: list[str]) -> tuple[subprocess.Popen, str, float]:
    """`python -m serving.main` on a free local port with `adapter_dir`, waited for until /health
    answers 200 (warm-up included): (the process, its URL, seconds to ready)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "serving.main", "--model", model, "--port", str(port)]
    command += ["--adapter-dir", str(adapter_dir), "--log-level", "warning", *flags]
    started = time.perf_counter()
    server = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)  # polling another process's health endpoint


async def client_loop(client, models, requests: int, offset: int, max_tokens: int, records: list) -> None:
    for k in range(requests):
        model = models[(offset + k) % len(models)]
        prompt = PROMPTS[(offset + k) % len(PROMPTS)]
        start = time.perf_counter()
        first, tokens = None, 0
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.7,
            seed=offset + k,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        records.append((start, (first or end) - start, end - start, tokens))


async def run_level(url: str, models: list[str], concurrency: int, per_client: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    records: list = []
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(client, models, per_client, i, max_tokens, records) for i in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = np.array([r[1] for r in records])
    e2e = np.array([r[2] for r in records])
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "wall_s": wall,
        "requests_per_s": len(records) / wall,
        "output_tokens_per_s": sum(r[3] for r in records) / wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "e2e_p50_s": float(np.percentile(e2e, 50)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--concurrency", default="8,32,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    import httpx

    from plora_jax.config import smollm2_135m
    from plora_jax.lora.peft import save_random_adapter

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="plora-serve-load-") as tmp:
        root = Path(tmp) / "adapters"
        for i in range(args.adapters):
            rank = (8, 16, 32, 64)[i % 4]
            save_random_adapter(
                root / f"lora{i}", smollm2_135m(), rank, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=i
            )
        flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "1024", "--max-queue", "1024"]
        server, url, ready_s = launch_server(args.model, root, flags)
        try:
            print(f"machine: {machine()}\nserver ready in {ready_s:.0f} s (warm-up included)", flush=True)
            models = ["llama", *(f"lora{i}" for i in range(args.adapters))]
            results = []
            for c in levels:
                result = asyncio.run(run_level(url, models, c, args.requests_per_client, args.max_tokens))
                results.append(result)
                print(
                    f"C={c}: {result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} tok/s, "
                    f"TTFT p50 {result['ttft_p50_s']:.2f} s p99 {result['ttft_p99_s']:.2f} s",
                    flush=True,
                )
            metrics = httpx.get(url + "/metrics").text
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(120)
    payload = {
        "machine": machine(),
        "server_ready_s": ready_s,
        "max_tokens": args.max_tokens,
        "adapters": args.adapters,
        "levels": results,
        "server_exit_code": code,
        "compiles_after_warmup": next(
            (
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("plora_compiles_after_warmup")
            ),
            None,
        ),
    }
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
