"""Incremental detokenization, stop strings, and streaming (sync and asyncio) on the real model."""

import asyncio

import jax.numpy as jnp
import pytest
from helpers import write_tiny_gguf

from plora_jax import SamplingParams
from plora_jax.detokenizer import IncrementalDetokenizer
from plora_jax.models.gguf_loader import load_gguf

TEXT = "Ünïcödé ✓ 日本語 and a robot 🤖, done."


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.gguf"
    write_tiny_gguf(path, "F32")
    return load_gguf(path, jnp.float32)[2]


def stream_text(tokenizer, ids, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, [], **kwargs)
    deltas = []
    for token in ids:
        detok.add_token(token)
        deltas.append(detok.take_delta(False))
        if detok.stop_string is not None:
            break
    deltas.append(detok.take_delta(True))
    return deltas


def test_streamed_text_never_breaks_a_character(byte_tokenizer, engine):
    for tokenizer in (byte_tokenizer, engine.tokenizer):
        ids = tokenizer.encode(TEXT)
        deltas = stream_text(tokenizer, ids)
        assert "".join(deltas) == TEXT
        assert not any("\ufffd" in d for d in deltas)
    # one token per byte: the robot's 4 bytes arrive as 4 tokens and come out as one delta
    deltas = stream_text(byte_tokenizer, byte_tokenizer.encode("🤖"))
    assert [d for d in deltas if d] == ["🤖"]


def test_stop_string_is_held_back_then_cut(byte_tokenizer):
    ids = byte_tokenizer.encode("Hello world, again")
    deltas = stream_text(byte_tokenizer, ids, stop=["world"])
    assert "".join(deltas) == "Hello "
    assert not any("w" in d for d in deltas)  # a possible stop-string start is never streamed
    assert "".join(stream_text(byte_tokenizer, ids, stop=["world"], include_stop_str_in_output=True)) == "Hello world"
    assert "".join(stream_text(byte_tokenizer, ids, stop=["xyz"])) == "Hello world, again"


@pytest.fixture(scope="module")
def chat_prompt(engine):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}])


def test_stop_string_in_generation(engine, chat_prompt):
    free = engine.generate([chat_prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    words = free.text.split()
    assert len(words) > 4
    stop = words[len(words) // 2]
    out = engine.generate([chat_prompt], SamplingParams(max_tokens=40, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_stream_equals_generate(engine, chat_prompt):
    sp = SamplingParams(max_tokens=30, temperature=0)
    deltas = list(engine.stream(chat_prompt, sp))
    assert len(deltas) > 5
    assert "".join(deltas) == engine.generate([chat_prompt], sp)[0].text


def test_asyncio_consumers(engine, chat_prompt):
    sp = [SamplingParams(max_tokens=n, temperature=0) for n in (8, 16, 24)]

    async def consume(params):
        handle = engine.submit(chat_prompt, params)
        pieces, tokens = [], []
        async for event in handle.events():
            pieces.append(event.text)
            tokens += event.token_ids
        out = await handle.aresult()
        return "".join(pieces), tokens, out

    async def main():
        return await asyncio.gather(*(consume(p) for p in sp))

    for text, tokens, out in asyncio.run(main()):
        assert text == out.text and tokens == out.token_ids
        assert out.metrics.ttft_s > 0 and out.metrics.e2e_s >= out.metrics.ttft_s
