"""Generation demo: `python -m plora_jax.generate --model llama --prompt "..."`.

Loads a model (fetching the default one on first use), renders the prompt through the chat
template unless `--raw`, generates, and prints the text with load and decode timings. Every
EngineConfig and SamplingParams field is a flag (see --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .cli import add_dataclass_args, dataclass_from_args
from .config import EngineConfig
from .engine.sampling import SamplingParams

_SAMPLING_EXCLUDE = ("seed",)  # the engine's --seed seeds every request


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m plora_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); default: a sample question")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_dataclass_args(parser, EngineConfig, title="engine")
    add_dataclass_args(parser, SamplingParams, exclude=_SAMPLING_EXCLUDE, title="sampling")
    # A one-shot demo compiles only the shapes it uses (--warmup compiles every serving bucket).
    parser.set_defaults(max_tokens=64, temperature=0.0, warmup=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .engine import Engine

    args = build_parser().parse_args(argv)
    try:
        sampling = dataclass_from_args(SamplingParams, args, exclude=_SAMPLING_EXCLUDE)
        config = dataclass_from_args(EngineConfig, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    engine = Engine.from_pretrained(**dataclasses.asdict(config))
    load_s = time.perf_counter() - start
    prompts = args.prompt or ["What is the capital of France?"]
    if not args.raw:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    gen_s = time.perf_counter() - start
    for prompt, out in zip(args.prompt or ["What is the capital of France?"], outputs, strict=True):
        print(f">>> {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]\n")
    tokens = sum(len(o.token_ids) for o in outputs)
    source = "parameter cache" if engine.load_info["from_cache"] else "conversion"
    print(
        f"model {engine.model_config.name}: loaded in {load_s:.1f}s ({source}); "
        f"generated {tokens} tokens in {gen_s:.1f}s, compile included",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
