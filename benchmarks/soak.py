"""Soak on the live server: `python -m benchmarks.soak --minutes M --clients C --json OUT`.

Starts `python -m serving.main` as a separate process (the default model, warm-up on, random
PEFT adapters of mixed ranks in an --adapter-dir) and, for `--minutes`, runs `--clients`
closed-loop streaming clients (the official `openai` AsyncOpenAI client) over the base model and
the adapters, completions and chat alternating. A `--disconnect-share` of the streams is closed
by its client after the first chunks. Every `--swap-every-s` one adapter is replaced through the
API (unload, then load the same name from the other of two folders) while clients use it, and a
scraper reads /metrics every `--scrape-every-s`.

Each stream ends one way: completed (its finish chunk arrived), disconnected (on purpose),
failed with an error the client saw (an HTTP status, or an error chunk: for instance a request
still waiting for the adapter when it was unloaded), or lost (none of those: the stream ended
without a finish chunk or the client raised anything else). Printed and in `--json`: the
counts, 5xx responses, the swaps and their failed calls, the requests for the swapped adapter
answered 404 (the gap between the unload and the load), the server's resident memory at ready,
after the first minute, every 10 s and at the end, and, once idle, the KV blocks, adapter pins and running
requests left (from /metrics), and the server's exit code after SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plora_jax.cli import add_dataclass_args, dataclass_from_args

from .common import machine, write_json
from .serve_load import PROMPTS, launch_server


@dataclass(frozen=True)
class Soak:
    minutes: float = 10.0
    clients: int = 32
    adapters: int = 3  # served adapters besides the one that is replaced
    max_tokens: int = 24
    disconnect_share: float = 0.2  # streams their client closes after the first chunks
    swap_every_s: float = 7.0  # unload and load again the swapped adapter this often
    scrape_every_s: float = 1.0
    model: str = "llama"
    max_num_seqs: int = 32
    max_model_len: int = 1024
    seed: int = 0
    json: str = ""  # write the results here


SWAPPED = "swap"


def gauge(metrics: str, name: str) -> float | None:
    """A gauge's value from Prometheus text (the first sample of `name`)."""
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


async def client_loop(client, models: list[str], soak: Soak, index: int, deadline: float, counts: Counter) -> None:
    import openai

    rng = np.random.default_rng(soak.seed * 1000 + index)
    k = 0
    while time.monotonic() < deadline:
        model = models[int(rng.integers(len(models)))]
        prompt = PROMPTS[k % len(PROMPTS)]
        disconnect = rng.random() < soak.disconnect_share
        chat = k % 2 == 0
        k += 1
        try:
            if chat:
                messages = [{"role": "user", "content": prompt}]
                create = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=soak.max_tokens, stream=True
                )
            else:
                create = client.completions.create(model=model, prompt=prompt, max_tokens=soak.max_tokens, stream=True)
            stream = await create
            chunks, finished = 0, False
            async for chunk in stream:
                chunks += 1
                finished = finished or any(c.finish_reason for c in chunk.choices)
                if disconnect and chunks >= 2:
                    await stream.close()
                    break
            if disconnect and chunks >= 2:
                counts["disconnected"] += 1
            else:
                counts["completed" if finished else "lost"] += 1
        except openai.APIStatusError as e:
            counts["failed"] += 1
            counts[f"status_{e.status_code}"] += 1
            if e.status_code >= 500:
                counts["5xx"] += 1
            if e.status_code == 404 and model == SWAPPED:
                counts["swapped_404"] += 1
        except openai.APIError:  # an error chunk in the stream: the client saw why
            counts["failed"] += 1
            counts["stream_errors"] += 1
        except Exception:
            counts["lost"] += 1


async def swapper(url: str, folders: list[Path], soak: Soak, deadline: float, counts: Counter) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        turn = 0
        while time.monotonic() + soak.swap_every_s < deadline:
            await asyncio.sleep(soak.swap_every_s)  # the swap's period, not a wait for another task
            turn += 1
            unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": SWAPPED})
            load = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": SWAPPED, "lora_path": str(folders[turn % 2])}
            )
            counts["swaps"] += 1
            counts["swap_failures"] += (unload.status_code != 200) + (load.status_code != 200)


async def scraper(url: str, soak: Soak, deadline: float, counts: Counter) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            counts["scrapes"] += 1
            counts["scrape_failures"] += (await http.get("/metrics")).status_code != 200
            await asyncio.sleep(soak.scrape_every_s)  # the scrape period


async def run(url: str, folders: list[Path], soak: Soak, rss, memory: dict) -> Counter:
    import openai

    counts: Counter = Counter()
    models = ["llama", SWAPPED, *(f"lora{i}" for i in range(soak.adapters))]
    deadline = time.monotonic() + soak.minutes * 60
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def sample_memory() -> None:
        """The server's resident memory every 10 s (and after the first minute)."""
        first = min(60.0, soak.minutes * 30)
        begin = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(min(10.0, first))  # the sampling period of a reading
            now = time.monotonic() - begin
            memory["series"].append((round(now, 1), round(rss(), 1)))
            if "after_first_minute_mib" not in memory and now >= first:
                memory["after_first_minute_mib"] = rss()

    tasks = [client_loop(client, models, soak, i, deadline, counts) for i in range(soak.clients)]
    tasks += [swapper(url, folders, soak, deadline, counts), scraper(url, soak, deadline, counts)]
    await asyncio.gather(*tasks, sample_memory())
    await client.close()
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    add_dataclass_args(parser, Soak)
    soak = dataclass_from_args(Soak, parser.parse_args(argv))
    import httpx
    import psutil

    from plora_jax.config import smollm2_135m
    from plora_jax.lora.peft import save_random_adapter

    with tempfile.TemporaryDirectory(prefix="plora-soak-") as tmp:
        root = Path(tmp) / "adapters"
        targets = ("q_proj", "k_proj", "v_proj", "o_proj")
        for i in range(soak.adapters):
            save_random_adapter(root / f"lora{i}", smollm2_135m(), (8, 16, 32)[i % 3], targets, seed=i)
        folders = [root / "swap-a", root / "swap-b"]
        for j, folder in enumerate(folders):
            save_random_adapter(folder, smollm2_135m(), 16, targets, seed=100 + j)
        save_random_adapter(root / SWAPPED, smollm2_135m(), 16, targets, seed=100)
        flags = ["--max-num-seqs", str(soak.max_num_seqs), "--max-model-len", str(soak.max_model_len)]
        flags += ["--max-queue", "1024"]
        server, url, ready_s = launch_server(soak.model, root, flags)
        process = psutil.Process(server.pid)
        rss = lambda: process.memory_info().rss / 2**20
        memory = {"ready_mib": rss(), "series": []}
        try:
            print(f"machine: {machine()}\nserver ready in {ready_s:.0f} s", flush=True)
            started = time.perf_counter()
            counts = asyncio.run(run(url, folders, soak, rss, memory))
            wall = time.perf_counter() - started
            memory["end_mib"] = rss()
            deadline = time.monotonic() + 120
            while True:  # the server frees what disconnected streams held at its next steps
                metrics = httpx.get(url + "/metrics", timeout=30).text
                idle = gauge(metrics, "plora_running_requests") == 0 and gauge(metrics, "plora_queue_depth") == 0
                if (idle and gauge(metrics, "plora_kv_blocks_used") == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)  # polling a counter of another process
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(120)
    growth = memory["end_mib"] / memory["after_first_minute_mib"] - 1.0
    result = {
        "config": dataclasses.asdict(soak),
        "machine": machine(),
        "server_ready_s": ready_s,
        "wall_s": wall,
        "counts": dict(counts),
        "requests": sum(counts[k] for k in ("completed", "disconnected", "failed", "lost")),
        "memory_mib": memory,
        "memory_growth_after_first_minute": growth,
        "left_when_idle": {
            "kv_blocks_used": gauge(metrics, "plora_kv_blocks_used"),
            "adapters_pinned": gauge(metrics, "plora_adapters_pinned"),
            "running_requests": gauge(metrics, "plora_running_requests"),
        },
        "compiles_after_warmup": gauge(metrics, "plora_compiles_after_warmup"),
        "server_exit_code": code,
    }
    c = counts
    print(
        f"{result['requests']} requests in {wall:.0f} s: {c['completed']} completed, {c['disconnected']} disconnected, "
        f"{c['failed']} failed ({c['stream_errors']} error chunks, {c['swapped_404']} 404 on the swapped adapter), "
        f"{c['lost']} lost, {c['5xx']} 5xx; {c['swaps']} swaps ({c['swap_failures']} failed calls), "
        f"{c['scrapes']} scrapes ({c['scrape_failures']} failed)"
    )
    print(
        f"memory {memory['ready_mib']:.0f} MiB ready, {memory['after_first_minute_mib']:.0f} after the first minute, "
        f"{memory['end_mib']:.0f} at the end ({growth:+.1%}); left when idle: {result['left_when_idle']}; "
        f"exit code {code}"
    )
    write_json(soak.json or None, result)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
