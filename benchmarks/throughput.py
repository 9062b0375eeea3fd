"""Throughput and TTFT against transformers: `python -m benchmarks.throughput [--json OUT]`.

The same model (default: SmolLM2-135M-Instruct GGUF, float32 on CPU), the same chat prompts and
greedy decoding with the same `max_tokens` for both; EOS ends a request in both, and only real
generated tokens are counted. For each concurrency C:

- ours: a closed loop of C clients, each submitting its next request as soon as the previous one
  finishes (continuous batching); TTFT is measured from each request's submission;
- transformers: `generate` on batches of C prompts, left-padded, one batch after another; TTFT is
  the time from the batch's start to its first generated token (a streamer timestamps it).

Our engine is warmed up before timing (its warm-up time is reported); transformers gets one
untimed batch first. Both run on the same machine in the same process, one after the other.

Then the decode step itself, through the runner's public methods on the closed engine: one
step of `--step-rows` rows at `--step-context` tokens of context, beside the weight matmuls
of the same step alone (projections, MLP, vocabulary head; no attention, no sampling), the
compute bound measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from benchmarks.common import run_clients

TOPICS = [
    "the water cycle",
    "how vaccines work",
    "the French revolution",
    "black holes",
    "photosynthesis",
    "the history of the internet",
    "how a bicycle stays upright",
    "plate tectonics",
    "the stock market",
    "machine learning",
    "the Roman empire",
    "climate change",
    "how airplanes fly",
    "the human heart",
    "volcanoes",
    "the printing press",
]
STYLES = [
    "Explain {t} in two sentences.",
    "Write a short paragraph about {t} for a ten-year-old.",
    "List three surprising facts about {t}.",
    "I am preparing a talk for a general audience and I want to open with something memorable. "
    "Give me a one-sentence hook about {t}, and then a short outline with three points.",
]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        text = STYLES[i % len(STYLES)].format(t=TOPICS[i % len(TOPICS)])
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        prompts.append(tokenizer.encode(rendered, add_special_tokens=False))
    return prompts


def run_ours(engine, prompts, max_tokens: int, concurrency: int) -> dict:
    from plora_jax import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    outputs = [None] * len(prompts)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                i, prompt = queue.pop(0)
            outputs[i] = engine.submit(prompt, sp).result()

    elapsed = run_clients(client, concurrency)
    tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "tok_s": tokens / elapsed,
        "ttft_s": sum(o.metrics.ttft_s for o in outputs) / len(outputs),
        "tokens": tokens,
        "seconds": elapsed,
        "outputs": [o.token_ids for o in outputs],
    }


class _FirstToken:
    """A transformers streamer that records when the first generated token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_hf(model, prompts, max_tokens: int, concurrency: int, eos: set[int], pad: int) -> dict:
    import torch

    outputs, ttfts, start = [], [], time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(prompts), concurrency):
            batch = prompts[b : b + concurrency]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            streamer = _FirstToken()
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
            )
            ttfts += [(streamer.first or time.perf_counter()) - t0] * len(batch)
            for row in out[:, width:].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                outputs.append(row[:end])
    elapsed = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {
        "tok_s": tokens / elapsed,
        "ttft_s": sum(ttfts) / len(ttfts),
        "tokens": tokens,
        "seconds": elapsed,
        "outputs": outputs,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests = this x concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--step-rows", type=int, default=32)
    parser.add_argument("--step-context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed decode steps (median)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from benchmarks.common import machine, write_json
    from plora_jax import Engine
    from plora_jax.models.registry import resolve_model

    path = resolve_model(args.model)
    engine = Engine.from_pretrained(
        str(path), dtype="float32", max_model_len=1024, num_kv_blocks=2048, max_num_seqs=max(args.concurrency)
    )
    engine.wait_warm()  # every size built: no background compile competes with the timed runs
    warmup_s = engine.stats()["compile_s"] + engine.stats()["load_s"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    eos = set(engine.tokenizer.eos_token_ids)
    rows = []
    for c in args.concurrency:
        prompts = make_prompts(engine.tokenizer, c * args.requests_per_client)
        run_hf(hf, prompts[:c], 4, c, eos, pad=min(eos))  # untimed warm-up of this batch shape
        ours = run_ours(engine, prompts, args.max_tokens, c)
        ref = run_hf(hf, prompts, args.max_tokens, c, eos, pad=min(eos))
        same = sum(a == b for a, b in zip(ours.pop("outputs"), ref.pop("outputs"), strict=True)) / len(prompts)
        rows.append(
            {
                "concurrency": c,
                "requests": len(prompts),
                "ours_tok_s": ours["tok_s"],
                "hf_tok_s": ref["tok_s"],
                "ours_ttft_s": ours["ttft_s"],
                "hf_ttft_s": ref["ttft_s"],
                "speedup": ours["tok_s"] / ref["tok_s"],
                "ours_tokens": ours["tokens"],
                "hf_tokens": ref["tokens"],
                "same_output_fraction": same,
            }
        )
        r = rows[-1]
        print(
            f"concurrency {c:3d} ({len(prompts)} requests): ours {r['ours_tok_s']:7.1f} tok/s, "
            f"TTFT {r['ours_ttft_s']:.2f}s | transformers {r['hf_tok_s']:7.1f} tok/s, TTFT {r['hf_ttft_s']:.2f}s "
            f"| {r['speedup']:.2f}x tokens/s, same greedy output {same:.0%}",
            flush=True,
        )
    stats = engine.stats()
    engine.close()  # from here on the runner belongs to this thread
    step = decode_step_vs_matmuls(engine.runner, args.step_rows, args.step_context, args.repeats)
    print(
        f"decode step, {args.step_rows} rows at context {args.step_context}: {step['step_s'] * 1e3:.1f} ms; "
        f"its weight matmuls alone {step['matmuls_s'] * 1e3:.1f} ms -> {step['ratio']:.2f}x the compute bound "
        f"(attention: {stats['attention_implementation']})",
        flush=True,
    )
    result = {
        "rows": rows,
        "machine": machine(),
        "model": path.name,
        "max_tokens": args.max_tokens,
        "warmup_s": warmup_s,
        "compiles_after_warmup": stats["compiles_after_warmup"],
        "executables": stats["executables"],
        "attention_implementation": stats["attention_implementation"],
        "decode_step": step,
    }
    print(
        f"machine: {result['machine']}; our warm-up {warmup_s:.0f}s, "
        f"compiles after warm-up {stats['compiles_after_warmup']}"
    )
    write_json(args.json, result)
    return 0


def decode_step_vs_matmuls(runner, num_rows: int, context: int, repeats: int) -> dict:
    """Median time of one decode step of `num_rows` rows at `context` tokens (through
    `ModelRunner.decode`, sampler included) and of the same step's weight matmuls alone."""
    import statistics

    import jax
    import numpy as np

    from plora_jax import SamplingParams
    from plora_jax.engine.scheduler import DecodeRow, Request

    bs = runner.block_size
    per_row = -(-(context + 1) // bs)
    if num_rows * per_row > runner.config.num_kv_blocks - 1 or num_rows > runner.config.max_num_seqs:
        raise ValueError(f"{num_rows} rows x {context} tokens do not fit this engine's KV cache or decode batch")
    rows = []
    for r in range(num_rows):
        request = Request(f"step{r}", [1] * context, SamplingParams(temperature=0), 0, frozenset(), context + 1)
        request.blocks = list(range(1 + r * per_row, 1 + (r + 1) * per_row))
        request.seq_slot = r
        rows.append(DecodeRow(request, position=context, step=0))

    def timed(fn) -> float:
        jax.block_until_ready(fn())  # first call: warm
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    step_s = timed(lambda: runner.decode(rows).tokens)
    matmuls = runner.matmul_step()
    x = np.ones((runner.model_config.hidden_size, num_rows), np.float32) * 0.01
    matmuls_s = timed(lambda: matmuls(runner.params, x))
    return {"rows": num_rows, "context": context, "step_s": step_s, "matmuls_s": matmuls_s, "ratio": step_s / matmuls_s}


if __name__ == "__main__":
    sys.exit(main())
