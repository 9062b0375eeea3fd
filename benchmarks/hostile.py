"""Hostile requests, adapter files and clients against the live server:
`python -m benchmarks.hostile [--model llama] [--json OUT]`.

Starts `python -m serving.main` as its own process (an --adapter-dir of random PEFT adapters and
hostile ones written here) and runs a battery of what a hostile or unlucky user might send,
while a prober thread times /health every 50 ms. Each check says what it expects and whether it
held; kept apart from the test suite, and run against the server as it ships:

- numbers at and past every bound (top_k 2^31 included), then an ordinary request;
- adapters made to poison (infinite or huge alpha, a NaN alpha_pattern, huge or NaN weights),
  to hang (a backtracking rank_pattern key), to crash (malformed configs), to escape (a
  symlinked weights file), and a 1 MB adapter name; base-model outputs next to a valid adapter
  are compared with their solo answers;
- POSTs without JSON (a browser's cross-site "simple" request), absolute paths in answers;
- clients that leave: a plain request and a stream before its first byte (seconds until the
  server runs nothing, against the seconds its generation takes);
- large bodies (a 7.9 MB prompt, 6.6 MB of chat messages);
- echo: a request over the log-probability budget, and the largest ones it admits (64 prompts
  of max_model_len - 1 tokens with logprobs 1; with 20 alternatives, as many tokens as fit):
  their time and the server's peak resident memory;
- with `--warmup-check`, a second server on an empty cache with --max-queue 8: 50 requests
  while it warms up (how many are refused).

Printed, and with --json the whole record, including the /health latency during each check.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import machine, write_json
from .serve_load import launch_server

PROMPTS = ["The capital of France is", "Water boils at", "One, two, three,"]
GREEDY = {"max_tokens": 12, "temperature": 0}


class Prober:
    """/health every `every_s` on its own thread; `during()` gives the worst latency since `mark()`."""

    def __init__(self, url: str, every_s: float = 0.05):
        import httpx

        self.http, self.url, self.every_s = httpx.Client(timeout=60), url, every_s
        self.samples: list[tuple[float, float, int]] = []  # (when, seconds, status)
        self._since = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            start = time.perf_counter()
            try:
                status = self.http.get(self.url + "/health").status_code
            except Exception:
                status = 0
            self.samples.append((start, time.perf_counter() - start, status))

    def mark(self) -> None:
        self._since = time.perf_counter()

    def during(self) -> dict:
        window = [s for s in self.samples if s[0] >= self._since]
        return {
            "health_max_s": round(max((s[1] for s in window), default=0.0), 3),
            "health_not_200": sum(s[2] != 200 for s in window),
        }

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class PeakMemory:
    """The server's resident memory, sampled every 50 ms on a thread (`peak` in MiB)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return self.peak


def write_adapters(root: Path, model_config) -> dict[str, Path]:
    """One valid adapter and the hostile ones, each in its own folder under `root/hostile` (inside
    the --adapter-dir, so they may be loaded, but below its subfolders, so the start-up scan does
    not register them), and a malformed folder directly in `root` (the scan must skip it)."""
    from safetensors.numpy import load_file, save_file

    from plora_jax.lora.peft import save_random_adapter

    broken = save_random_adapter(root / "broken", model_config, 8, ("q_proj",))
    (broken / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": "x"}))
    folders = {"valid": save_random_adapter(root / "hostile" / "valid", model_config, 8, ("q_proj", "v_proj"))}

    def variant(name: str, config: dict | None = None, weights=None) -> None:
        path = save_random_adapter(root / "hostile" / name, model_config, 8, ("q_proj", "v_proj"))
        if config is not None:
            current = json.loads((path / "adapter_config.json").read_text())
            (path / "adapter_config.json").write_text(json.dumps({**current, **config}, allow_nan=True))
        if weights is not None:
            tensors = load_file(str(path / "adapter_model.safetensors"))
            key = next(k for k in tensors if "lora_B" in k)
            tensors[key][0, 0] = weights
            save_file(tensors, str(path / "adapter_model.safetensors"))
        folders[name] = path

    variant("alpha_inf", {"lora_alpha": math.inf})
    variant("alpha_1e300", {"lora_alpha": 1e300})
    variant("alpha_pattern_nan", {"alpha_pattern": {"v_proj": math.nan}})
    variant("weights_huge", weights=1e30)
    variant("weights_nan", weights=math.nan)
    variant("regex", {"rank_pattern": {"([a-z_.0-9]+)+z": 8}})
    variant("targets_int", {"target_modules": [1]})
    variant("rank_pattern_str", {"rank_pattern": "x"})
    variant("rank_pattern_unbalanced", {"rank_pattern": {"(": 8}})
    outside = save_random_adapter(root.parent / "outside", model_config, 8, ("q_proj",))
    link = save_random_adapter(root / "hostile" / "symlinked", model_config, 8, ("q_proj",))
    (link / "adapter_model.safetensors").unlink()
    (link / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    folders["symlinked"] = link
    return folders


class Battery:
    def __init__(self, url: str, pid: int, root: Path, folders: dict[str, Path], max_model_len: int):
        import httpx

        self.url, self.pid, self.root, self.folders = url, pid, root, folders
        self.max_model_len = max_model_len
        self.http = httpx.Client(base_url=url, timeout=900)
        self.prober = Prober(url)
        self.results: dict[str, dict] = {}

    def check(self, name: str, fn) -> None:
        self.prober.mark()
        start = time.perf_counter()
        try:
            record = fn()
        except Exception as e:  # a check that raises did not hold
            record = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        record |= {"seconds": round(time.perf_counter() - start, 3), **self.prober.during()}
        record["ok"] = bool(record.get("ok")) and self.http.get("/health").status_code == 200
        self.results[name] = record
        print(f"{'ok ' if record['ok'] else 'BAD'} {name}: {json.dumps(record)[:300]}", flush=True)

    def complete(self, **body) -> dict:
        r = self.http.post("/v1/completions", json={"model": "llama", "prompt": PROMPTS[0], **GREEDY, **body})
        return {
            "status": r.status_code,
            "body": r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text,
        }

    # --- the checks -------------------------------------------------------------------------
    def bounds(self) -> dict:
        outside = [
            ("top_k", 2**31), ("top_k", -2), ("max_tokens", 2**31), ("max_tokens", -1), ("seed", 2**32),
            ("seed", -1), ("n", 17), ("n", 0), ("temperature", 2.5), ("top_p", 0), ("logprobs", 21),
            ("frequency_penalty", 3), ("repetition_penalty", 1000), ("stop_token_ids", [2**40]),
            ("stop", "s" * 10_000), ("prompt", [2**31]), ("prompt", [49152]), ("model", "m" * 100_000),
        ]  # fmt: skip
        refused = {}
        for field, value in outside:
            r = self.complete(**{field: value})
            param = r["body"]["error"]["param"] if isinstance(r["body"], dict) and "error" in r["body"] else None
            refused[f"{field}={str(value)[:20]}"] = [r["status"], param]
        at_bounds = [self.complete(top_k=2**31 - 1)["status"], self.complete(seed=2**32 - 1, temperature=2)["status"]]
        normal = self.complete()["status"]
        ok = all(s == 400 and p and p.split("[")[0] == f.split("=")[0] for f, (s, p) in refused.items())
        ok &= at_bounds == [200, 200] and normal == 200
        return {"ok": ok, "refused": refused, "at_bounds": at_bounds, "then": normal}

    def solo(self) -> list[str]:
        return [self.complete(prompt=p)["body"]["choices"][0]["text"] for p in PROMPTS]

    def poisoned_adapters(self) -> dict:
        loads = {}
        for name in ("alpha_inf", "alpha_1e300", "alpha_pattern_nan", "weights_huge", "weights_nan"):
            r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(self.folders[name])})
            loads[name] = [r.status_code, r.json()["error"]["param"] if r.status_code != 200 else None]
        solo = self.solo()
        valid = self.http.post(
            "/v1/load_lora_adapter", json={"lora_name": "valid", "lora_path": str(self.folders["valid"])}
        )
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            adapter_call = pool.submit(self.complete, model="valid", prompt=PROMPTS[1])
            packed = list(pool.map(lambda p: self.complete(prompt=p)["body"]["choices"][0]["text"], PROMPTS))
            adapter_call.result()
        ok = all(status == 400 and param == "lora_path" for status, param in loads.values())
        ok &= valid.status_code == 200 and packed == solo
        return {"ok": ok, "loads": loads, "packed_equals_solo": packed == solo}

    def hanging_and_malformed(self) -> dict:
        loads = {}
        for name in ("regex", "targets_int", "rank_pattern_str", "rank_pattern_unbalanced", "symlinked"):
            start = time.perf_counter()
            r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(self.folders[name])})
            loads[name] = [r.status_code, r.json()["error"]["param"], round(time.perf_counter() - start, 3)]
        r = self.http.post(
            "/v1/load_lora_adapter", json={"lora_name": "n" * 2**20, "lora_path": str(self.folders["valid"])}
        )
        loads["1MB name"] = [r.status_code, r.json()["error"]["param"], None]
        ok = all(s == 400 for s, _, _ in loads.values()) and loads["regex"][2] < 2.0
        ok &= loads["1MB name"][1] == "lora_name"
        return {"ok": ok, "loads": loads}

    def browser_and_paths(self) -> dict:
        body = json.dumps({"lora_name": "valid"}).encode()
        no_type = self.http.post("/v1/unload_lora_adapter", content=body, headers={"content-type": ""}).status_code
        text_plain = self.http.post("/v1/unload_lora_adapter", content=body, headers={"content-type": "text/plain"})
        still = "valid" in {m["id"] for m in self.http.get("/v1/models").json()["data"]}
        listing = self.http.get("/v1/models").text
        bad = self.http.post(
            "/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": str(self.folders["weights_nan"])}
        )
        leaks = [t for t in (listing, bad.text) if str(self.root) in t or str(self.root.resolve()) in t]
        ok = no_type == 415 and text_plain.status_code == 415 and still and not leaks
        return {"ok": ok, "no_content_type": no_type, "text_plain": text_plain.status_code, "leaks": len(leaks)}

    def running(self) -> float:
        from .soak import gauge

        return gauge(self.http.get("/metrics").text, "plora_running_requests") or 0.0

    def leaving_clients(self) -> dict:
        out = {}
        generation = self.http.post(
            "/v1/completions", json={"model": "llama", "prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True}
        )
        out["generation_s"] = round(generation.elapsed.total_seconds(), 2)
        for stream, leave_after in ((False, 0.5), (True, 0.0)):
            body = json.dumps(
                {"model": "llama", "prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True, "stream": stream}
            )
            host, port = self.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as s:
                s.sendall(
                    f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
                )
                time.sleep(leave_after)  # the client stays this long, then goes
            left = time.perf_counter()
            while self.running() > 0 and time.perf_counter() - left < 120:
                time.sleep(0.05)
            out["stream" if stream else "plain"] = round(time.perf_counter() - left, 2)
        ok = max(out["stream"], out["plain"]) < min(5.0, out["generation_s"] / 2)
        return {"ok": ok, "seconds_until_nothing_runs": out}

    def large_bodies(self) -> dict:
        prompt = self.http.post("/v1/completions", json={"model": "llama", "prompt": "word " * 1_600_000})
        messages = [{"role": "user", "content": "hi there"}] * 250_000
        chat = self.http.post("/v1/chat/completions", json={"model": "llama", "messages": messages})
        ok = prompt.status_code in (400, 413) and chat.status_code in (400, 413)
        return {"ok": ok, "prompt_7_9MB": prompt.status_code, "messages_6_6MB": chat.status_code}

    def echo(self, prompts: int, top: int, length: int | None = None) -> dict:
        """The largest echo the budget admits at `top` alternatives over `prompts` prompts (or
        prompts of `length` tokens)."""
        from plora_jax.limits import MAX_LOGPROB_ENTRIES

        per_token = 1 + top
        length = length or min(self.max_model_len - 1, MAX_LOGPROB_ENTRIES // per_token // prompts)
        rng = np.random.default_rng(0)
        ids = [rng.integers(100, 40_000, length).tolist() for _ in range(prompts)]
        over = self.http.post(
            "/v1/completions",
            json={"model": "llama", "prompt": ids + [ids[0]] * 64, "echo": True, "max_tokens": 0, "logprobs": top},
        )
        memory, before = PeakMemory(self.pid), rss_mb(self.pid)
        start = time.perf_counter()
        r = self.http.post(  # no client timeout: the time it takes is the figure
            "/v1/completions",
            json={"model": "llama", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": top},
            timeout=None,
        )
        seconds = time.perf_counter() - start
        peak = memory.stop()
        entries = prompts * length * per_token
        ok = r.status_code == 200 and over.status_code == 400 and entries <= MAX_LOGPROB_ENTRIES
        return {
            "ok": ok,
            "prompts": prompts,
            "tokens_each": length,
            "logprob_entries": entries,
            "seconds": round(seconds, 1),
            "rss_before_mb": round(before),
            "rss_peak_mb": round(peak),
            "response_mb": round(len(r.content) / 2**20, 1),
            "over_budget_status": over.status_code,
        }


def warmup_admission(model: str, root: Path, workdir: Path) -> dict:
    """50 requests while a server on an empty cache warms up, with --max-queue 8."""
    import subprocess

    import httpx

    from .serve_load import free_port

    port = free_port()
    command = [sys.executable, "-m", "serving.main", "--model", model, "--port", str(port), "--max-queue", "8"]
    command += ["--cache-dir", str(workdir / "fresh-cache"), "--log-level", "warning"]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "warming":
                    break
            except (httpx.HTTPError, ValueError):
                time.sleep(0.5)
        from concurrent.futures import ThreadPoolExecutor

        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        with ThreadPoolExecutor(50) as pool:
            statuses = list(
                pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=900).status_code, range(50))
            )
        refused = statuses.count(429)
        return {
            "ok": refused >= 40 and statuses.count(200) + refused == 50,
            "accepted": statuses.count(200),
            "refused": refused,
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--echo-prompts", type=int, default=64, help="prompts of the largest echo at logprobs 1")
    parser.add_argument("--warmup-check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from plora_jax.models.loader import load_front_end

    model_config, _ = load_front_end(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="plora-hostile-"))
    root = workdir / "adapters"
    folders = write_adapters(root, model_config)
    server, url, ready_s = launch_server(args.model, root, ["--max-queue", "256"])
    max_model_len = min(4096, model_config.max_position_embeddings)
    battery = Battery(url, server.pid, root, folders, max_model_len)
    try:
        battery.check("bounds", battery.bounds)
        battery.check("poisoned_adapters", battery.poisoned_adapters)
        battery.check("hanging_and_malformed_adapters", battery.hanging_and_malformed)
        battery.check("browser_and_paths", battery.browser_and_paths)
        battery.check("leaving_clients", battery.leaving_clients)
        battery.check("large_bodies", battery.large_bodies)
        battery.echo(1, 1, length=600)  # builds the scoring executables: the figures below are warm
        battery.check("echo_top20_largest", lambda: battery.echo(6, 20))
        battery.check("echo_largest", lambda: battery.echo(args.echo_prompts, 1))
    finally:
        battery.prober.close()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
    if args.warmup_check:
        record = warmup_admission(args.model, root, workdir)
        battery.results["warmup_admission"] = record
        print(f"{'ok ' if record['ok'] else 'BAD'} warmup_admission: {record}")
    result = {
        "benchmark": "hostile",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "ready_s": round(ready_s, 1),
        "checks": battery.results,
        "held": sum(r["ok"] for r in battery.results.values()),
        "total": len(battery.results),
        "server_exit": exit_code,
    }
    print(f"{result['held']}/{result['total']} checks held; server exit {exit_code}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if (lambda r: r["held"] == r["total"])(main()) else 1)
