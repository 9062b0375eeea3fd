"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client: texts
equal the engine's with the same seed, streaming and not, on the base model and adapters;
adapters listed, loaded and unloaded; 32 concurrent streams over 6 adapters; a disconnect frees
its resources; a full queue answers 429; every error is OpenAI's error JSON with its status."""

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from plora_jax import Engine, SamplingParams  # noqa: E402
from plora_jax.config import smollm2_135m  # noqa: E402
from plora_jax.lora.peft import save_random_adapter  # noqa: E402
from serving.app import ServerState, build_app  # noqa: E402
from serving.sources import AdapterSources  # noqa: E402

pytestmark = pytest.mark.slow  # a live server over the real model

PROMPT = "The three primary colours are"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(6):
        save_random_adapter(root / f"lora{i}", smollm2_135m(), 8 * (1 + i % 2), ("q_proj", "v_proj"), seed=i)
    extra = tmp_path_factory.mktemp("elsewhere")
    save_random_adapter(extra / "outside", smollm2_135m(), 8, ("q_proj",), seed=9)
    # The session engine's shapes (conftest): its executables come back from the executable
    # cache instead of being compiled again.
    engine = Engine.from_pretrained(str(smollm_path), dtype="float32", warmup=False, policy="lru")
    engine.add_adapter_dir(root)
    state = ServerState(engine, "llama", AdapterSources.of([str(root)]), None, max_queue=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, engine=engine, state=state, root=root, extra=extra)
    server.should_exit = True
    thread.join(30)
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference(engine, prompt, params, adapter):
    return engine.generate([prompt], params, adapters=[adapter])[0].text


@pytest.mark.parametrize("model", ["llama", "lora0", "lora1"])
def test_texts_equal_engine_generate(server, client, model):
    adapter = None if model == "llama" else model
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    expected = reference(server.engine, PROMPT, params, adapter)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert out.choices[0].text == expected and out.usage.completion_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=7, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected

    messages = [{"role": "user", "content": "Name a colour."}]
    chat_prompt = server.engine.tokenizer.apply_chat_template(messages)
    expected = reference(server.engine, chat_prompt, params, adapter)
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0.8, top_p=0.9, seed=7
    )
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_stop_strings_and_max_tokens(server, client):
    out = client.completions.create(model="llama", prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"])
    assert " 6" not in out.choices[0].text and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model="llama", prompt="1, 2, 3,", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_models_and_load_unload_round_trip(server, client):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"llama", *(f"lora{i}" for i in range(6))}
    assert listed["lora1"].model_extra["rank"] == 16 and listed["lora1"].model_extra["residency"] in (
        "disk",
        "host",
        "loading",
        "device",
    )
    with httpx.Client(base_url=server.url) as http:
        copy = server.root / "lora0"
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(copy)})
        assert r.status_code == 200, r.text
        assert "again" in {m.id for m in client.models.list().data}
        assert client.completions.create(model="again", prompt=PROMPT, max_tokens=2).choices[0].text is not None
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "again"})
        assert r.status_code == 200 and "again" not in {m.id for m in client.models.list().data}
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(server.extra / "outside")})
        assert r.status_code == 400 and "outside the configured adapter folders" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(server.root / ".." / "x")})
        assert r.status_code == 400
        link = server.root / "escape"  # the scan's rule: a symlink must resolve inside the folder
        link.symlink_to(server.extra / "outside", target_is_directory=True)
        try:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(link)})
            assert r.status_code == 400 and "outside the configured adapter folders" in r.json()["error"]["message"]
        finally:
            link.unlink()
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "never"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def metric(text: str, name: str, **labels) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + ("{" + label + "}" if label else "")) + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    return float(match[1]) if match else 0.0


def test_32_concurrent_streams_over_6_adapters(server):
    before = httpx.get(server.url + "/metrics").text
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(i):
        stream = await client.completions.create(
            model=f"lora{i % 6}", prompt=f"{PROMPT} {i}", max_tokens=4, temperature=0, stream=True
        )
        ids, pieces, reasons = set(), [], []
        async for c in stream:
            ids.add(c.id)
            pieces.append(c.choices[0].text)
            reasons.append(c.choices[0].finish_reason)
        return ids, "".join(pieces), reasons

    async def run():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    ids = [next(iter(r[0])) for r in results]
    assert all(len(r[0]) == 1 for r in results) and len(set(ids)) == 32  # one id each, none shared
    assert all(r[2][-1] in ("length", "stop") and r[2].count(None) == len(r[2]) - 1 for r in results)
    after = httpx.get(server.url + "/metrics").text
    ok = metric(after, "plora_requests_total", endpoint="completions", status="200") - metric(
        before, "plora_requests_total", endpoint="completions", status="200"
    )
    assert ok == 32
    assert metric(after, "plora_queue_depth") == 0 and metric(after, "plora_running_requests") == 0
    assert metric(after, "plora_adapters", tier="device") >= 1


def wait_idle(engine, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_request(server):
    body = {"model": "lora2", "prompt": PROMPT, "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    stats = wait_idle(server.engine)
    assert stats["adapters_pinned"] == 0 and stats["kv_blocks_used"] == 0


def test_full_queue_answers_429_and_the_server_stays_healthy(server, client):
    server.state.max_queue = 0
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "llama", "prompt": PROMPT})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="llama", prompt=PROMPT, max_tokens=2)
        server.state.max_queue = 2  # one request's choices count against the queue too
        r = httpx.post(server.url + "/v1/completions", json={"model": "llama", "prompt": PROMPT, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    finally:
        server.state.max_queue = 64
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=2).choices[0].finish_reason


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "llama", "prompt": "word " * 4200}, 400, "prompt"),
        ({"model": "llama", "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": "llama", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "llama", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "llama", "prompt": "x", "seed": -1}, 400, "seed"),
        ({"model": "llama", "prompt": "x", "stop": [1]}, 400, "stop"),
        ({"model": "llama", "prompt": "x", "n": 17}, 400, "n"),
        ({"model": "llama", "prompt": []}, 400, "prompt"),
        ({"model": "llama", "prompt": [1, "a"]}, 400, "prompt"),
        ({"model": "llama", "prompt": [[5, -1]]}, 400, "prompt"),
        ({"model": "llama", "prompt": ["x"] * 65}, 400, "prompt"),
        ({"model": "llama", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "llama", "prompt": "x", "best_of": 2}, 400, "best_of"),
        ({"model": "llama", "prompt": "x", "suffix": "!"}, 400, "suffix"),
        ({"model": "llama", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": "llama", "prompt": "x", "echo": "yes"}, 400, "echo"),
        ({"model": "llama", "prompt": "x", "echo": True, "stream": True}, 400, "echo"),
        ({"model": "llama", "prompt": "x", "echo": False, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "llama", "prompt": "x", "logit_bias": {"13": 5}}, 400, "logit_bias"),
        ({"model": "llama", "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ({"model": "llama", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": "llama", "prompt": "x", "temperature": "1"}, 400, "temperature"),
        ({"model": "llama", "prompt": "x", "n": True}, 400, "n"),
        ({"model": "llama", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"model": "llama", "prompt": "x", "min_p": 0.05}, 400, "min_p"),
        ({"model": "llama"}, 400, "prompt"),
        ({"prompt": "x"}, 400, "model"),
        ("a JSON string, not an object", 400, None),
    ],
)
def test_errors_are_openai_json(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    if not isinstance(body, dict):
        assert "must be a JSON object" in error["message"]


CHAT = {"model": "llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        ("tool_choice", "auto"),
        ("parallel_tool_calls", False),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("response_format", {"type": "json_object"}),
        ("min_p", 0.1),
        ("min_tokens", 2),
    ],
)
def test_each_unimplemented_field_is_refused_by_name(server, client, field, value):
    """Never silence: a tool definition, a JSON schema or logprobs would otherwise be ignored."""
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "not supported" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**CHAT, extra_body={field: value})  # as a client sends vLLM's fields


def test_neutral_values_of_unimplemented_fields_are_accepted(server, client):
    neutral = {"tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}}
    out = client.chat.completions.create(**CHAT, **neutral, extra_body={"min_p": 0.0, "min_tokens": 0})
    assert out.choices[0].finish_reason == "length"
    out = client.completions.create(model="llama", prompt="x", max_tokens=1, logprobs=0, echo=False, best_of=1)
    assert out.usage.completion_tokens == 1


def test_penalties_reach_the_sampler(server, client):
    """OpenAI's penalties and vLLM's repetition_penalty (extra_body) give the engine's tokens
    under the same SamplingParams, and change the greedy text."""
    penalties = dict(frequency_penalty=1.2, presence_penalty=0.6)
    common = dict(max_tokens=16, temperature=0)
    out = client.completions.create(
        model="lora1", prompt=PROMPT, **common, **penalties, extra_body={"repetition_penalty": 1.3}
    )
    params = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3, **penalties)
    assert out.choices[0].text == reference(server.engine, PROMPT, params, "lora1")
    plain = client.completions.create(model="lora1", prompt=PROMPT, **common)
    assert out.choices[0].text != plain.choices[0].text


def test_vllm_sampling_extensions_reach_the_engine(server, client):
    """stop_token_ids, include_stop_str_in_output and skip_special_tokens (vLLM's extra_body
    fields) give what the engine gives under the same SamplingParams, and change the answer."""
    common = dict(max_tokens=12, temperature=0)
    plain = client.completions.create(model="lora0", prompt=PROMPT, **common)
    ids = server.engine.tokenizer.encode(plain.choices[0].text)
    cut = client.completions.create(model="lora0", prompt=PROMPT, **common, extra_body={"stop_token_ids": [ids[2]]})
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(ids[2],))
    assert cut.choices[0].text == reference(server.engine, PROMPT, params, "lora0")
    assert cut.choices[0].finish_reason == "stop" and len(cut.choices[0].text) < len(plain.choices[0].text)
    stop = plain.choices[0].text.strip().split()[1]
    kept = client.completions.create(
        model="lora0", prompt=PROMPT, **common, stop=[stop], extra_body={"include_stop_str_in_output": True}
    )
    assert kept.choices[0].text.endswith(stop)
    params = SamplingParams(max_tokens=12, temperature=0, stop=(stop,), include_stop_str_in_output=True)
    assert kept.choices[0].text == reference(server.engine, PROMPT, params, "lora0")
    # after a finished chat turn the model opens the next one with a special token
    turn = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    raw = dict(model="llama", prompt=turn, max_tokens=3, temperature=0)
    shown = client.completions.create(**raw, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    hidden = client.completions.create(**raw, extra_body={"ignore_eos": True})
    assert "<|im_" in shown.choices[0].text and "<|" not in hidden.choices[0].text, (shown, hidden)


def test_the_schema_declares_no_422(server):
    """Validation errors are 400 with OpenAI's error JSON, so FastAPI's default 422 is not listed."""
    schema = httpx.get(server.url + "/openapi.json").json()
    statuses = {s for path in schema["paths"].values() for op in path.values() for s in op["responses"]}
    assert "422" not in statuses and {"200", "400"} <= statuses
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_token_id_and_batched_prompts_and_n_equal_single_requests(server, client):
    """Choices come prompt by prompt, then sample by sample; sample j of a seeded request is the
    single request with seed + j; token ids are the same prompt as its text; streamed choices
    (merged, each chunk carrying its index) equal the whole answer's."""
    sampled = dict(max_tokens=8, temperature=0.9, top_p=0.95)
    other = "Water boils at"

    def single(prompt, seed):
        return client.completions.create(model="lora0", prompt=prompt, seed=seed, **sampled).choices[0].text

    ids = server.engine.tokenizer.encode(PROMPT)
    assert single(ids, 3) == single(PROMPT, 3)
    out = client.completions.create(model="lora0", prompt=[PROMPT, other], n=2, seed=3, **sampled)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert texts == [single(PROMPT, 3), single(PROMPT, 4), single(other, 3), single(other, 4)]
    assert texts[0] != texts[1]  # two samples, not one twice
    assert out.usage.prompt_tokens == len(ids) + len(server.engine.tokenizer.encode(other))  # once per prompt
    assert out.usage.completion_tokens == 4 * 8
    batched_ids = client.completions.create(
        model="lora0", prompt=[ids, server.engine.tokenizer.encode(other)], n=2, seed=3, **sampled
    )
    assert [c.text for c in batched_ids.choices] == texts
    streamed = ["", "", "", ""]
    finished = set()
    for c in client.completions.create(model="lora0", prompt=[PROMPT, other], n=2, seed=3, stream=True, **sampled):
        for choice in c.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2, 3}
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="lora0", messages=messages, n=3, seed=5, **sampled)
    alone = client.chat.completions.create(model="lora0", messages=messages, seed=7, **sampled)
    assert len(chat.choices) == 3 and chat.choices[2].message.content == alone.choices[0].message.content


def test_logprobs_equal_transformers_log_softmax(server, client, hf_model):
    """Completions' and chat's log-probabilities of the chosen and top tokens against
    transformers' log-softmax at the same positions (base model, f32), greedy and at
    temperature 0.7 (the temperature-scaled distribution the token was drawn from)."""
    import torch

    tokenizer = server.engine.tokenizer
    text_of = lambda t: tokenizer.decode([t], skip_special_tokens=False)

    def reference(prompt: str, n: int, temperature: float, seed: int):
        """The engine's own tokens for the same request, and transformers' log-softmax there."""
        params = SamplingParams(max_tokens=n, temperature=temperature, seed=seed)
        out = server.engine.generate([prompt], params)[0]
        ids = out.prompt_token_ids + out.token_ids[:-1]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, len(out.prompt_token_ids) - 1 :]
        return out.token_ids, torch.log_softmax(logits / (temperature or 1.0), dim=-1).numpy()

    def check_top(alternatives: dict, row, k: int) -> None:
        best = np.argsort(-row)[:k]
        assert set(alternatives) == {text_of(t) for t in best}
        np.testing.assert_allclose(sorted(alternatives.values()), sorted(row[best]), atol=1e-3)

    for temperature in (0.0, 0.7):
        out = client.completions.create(
            model="llama", prompt=PROMPT, max_tokens=6, temperature=temperature, seed=11, logprobs=3
        ).choices[0]
        ids, ref = reference(PROMPT, 6, temperature, 11)
        lp = out.logprobs
        assert lp.tokens == [text_of(t) for t in ids]
        np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(len(ids)), ids], atol=1e-3)
        for i, top in enumerate(lp.top_logprobs):
            check_top(top, ref[i], 3)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    messages = [{"role": "user", "content": "Name a colour."}]
    kwargs = dict(max_tokens=5, temperature=0.7, seed=2)
    out = client.chat.completions.create(model="llama", messages=messages, logprobs=True, top_logprobs=4, **kwargs)
    ids, ref = reference(tokenizer.apply_chat_template(messages), 5, 0.7, 2)
    entries = out.choices[0].logprobs.content
    assert [e.token for e in entries] == [text_of(t) for t in ids]
    for i, e in enumerate(entries):
        assert abs(e.logprob - ref[i, ids[i]]) <= 1e-3 and bytes(e.bytes).decode() == e.token
        check_top({a.token: a.logprob for a in e.top_logprobs}, ref[i], 4)
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=1).choices[0].logprobs is None


def test_streamed_logprobs_equal_the_unstreamed_ones(server, client):
    """Streamed, each chunk carries its tokens' logprobs in the endpoint's shape; put together
    they are the unstreamed answer's (completions' text_offset continuing across chunks)."""
    from serving.schema import ChatCompletionChunk, CompletionChunk

    sampled = dict(max_tokens=8, temperature=0.7, seed=11)
    whole = client.completions.create(model="lora0", prompt=PROMPT, logprobs=3, **sampled).choices[0].logprobs
    tokens, values, tops, offsets = [], [], [], []
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "lora0", "prompt": PROMPT, "logprobs": 3, "stream": True, **sampled},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = CompletionChunk.model_validate_json(line[6:]).choices[0]
                if choice.logprobs is not None:
                    tokens += choice.logprobs.tokens
                    values += choice.logprobs.token_logprobs
                    tops += choice.logprobs.top_logprobs
                    offsets += choice.logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert [list(t) for t in tops] == [list(t) for t in whole.top_logprobs]  # the same alternatives
    np.testing.assert_allclose(values, whole.token_logprobs, atol=1e-6)
    top_values = lambda rows: [v for row in rows for v in row.values()]
    np.testing.assert_allclose(top_values(tops), top_values(whole.top_logprobs), atol=1e-6)

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = dict(model="llama", messages=messages, logprobs=True, top_logprobs=2, **sampled)
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = []
    for part in client.chat.completions.create(stream=True, **chat):
        ChatCompletionChunk.model_validate(part.model_dump())
        if part.choices and part.choices[0].logprobs is not None:
            streamed += part.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs] for e in whole]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in whole], atol=1e-6)


def test_echo_returns_the_prompt_with_its_logprobs(server, client, hf_model):
    """lm-evaluation-harness's loglikelihood request (echo, max_tokens 0, logprobs 1): the
    prompt's tokens with transformers' log-softmax at each position (the first: null); with
    max_tokens 3, the generated tokens follow, as the request without echo gives them."""
    import torch

    tokenizer = server.engine.tokenizer
    text_of = lambda t: tokenizer.decode([t], skip_special_tokens=False)
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], dim=-1).numpy()
    out = client.completions.create(model="llama", prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == PROMPT and lp.tokens == [text_of(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-3)
    for i, top in enumerate(lp.top_logprobs[1:]):
        ((text, value),) = top.items()
        assert text == text_of(int(np.argmax(ref[i]))) and abs(value - ref[i].max()) <= 1e-3
    greedy = dict(model="llama", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0)
    more = client.completions.create(echo=True, **greedy).choices[0]
    alone = client.completions.create(**greedy).choices[0]
    assert more.text == PROMPT + alone.text
    assert more.logprobs.tokens == lp.tokens + alone.logprobs.tokens
    np.testing.assert_allclose(more.logprobs.token_logprobs[len(ids) :], alone.logprobs.token_logprobs, atol=1e-5)
    by_ids = client.completions.create(model="llama", prompt=ids, echo=True, max_tokens=1)
    assert by_ids.choices[0].text.startswith(tokenizer.decode(ids, skip_special_tokens=False))
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_max_tokens_beyond_the_context_names_the_limit(server):
    prompt_tokens = len(server.engine.tokenizer.encode(PROMPT))
    room = server.engine.max_model_len - prompt_tokens
    r = httpx.post(server.url + "/v1/completions", json={"model": "llama", "prompt": PROMPT, "max_tokens": room + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert f"at most {room} can be generated" in r.json()["error"]["message"]
    chat = {**CHAT, "max_tokens": None, "max_completion_tokens": 10**6}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_oversized_bodies_get_413_and_the_server_stays_healthy(server, client):
    server.state.max_body_bytes = 4096
    try:
        big = {"model": "llama", "prompt": "word " * 2000, "max_tokens": 1}
        r = httpx.post(server.url + "/v1/completions", json=big)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: cut off while reading
            yield b'{"model": "llama", "prompt": "'
            for _ in range(100):
                yield b"word " * 20
            yield b'"}'

        r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=1).usage.completion_tokens == 1
    finally:
        server.state.max_body_bytes = 8 * 2**20
    assert httpx.get(server.url + "/health").status_code == 200


def test_replacing_an_adapter_while_a_stream_runs_on_the_old_version(server, client):
    """Unload then load of one name (vLLM's way to replace an adapter) while a stream reads the
    old version: the load succeeds at once, the stream ends with the old version's text, the
    next request gets the new version's, and no adapter page is left pinned."""
    old, new = server.root / "lora2", server.root / "lora3"
    greedy = dict(prompt=PROMPT, max_tokens=120, temperature=0, extra_body={"ignore_eos": True})
    want_old = client.completions.create(model="lora2", **greedy).choices[0].text
    want_new = client.completions.create(model="lora3", **greedy).choices[0].text
    assert want_old != want_new
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(old)}).status_code == 200
        stream = iter(client.completions.create(model="swap", stream=True, **greedy))
        text = next(stream).choices[0].text  # the old version is running
        assert server.engine.stats()["adapters_pinned"] >= 1  # still running (120 tokens take seconds here)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(new)})
        assert r.status_code == 200, r.text
        assert client.completions.create(model="swap", **greedy).choices[0].text == want_new
        text += "".join(c.choices[0].text for c in stream)
        assert text == want_old
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
    wait_idle(server.engine)
    assert server.engine.stats()["adapters_pinned"] == 0


def test_malformed_json_unknown_route_and_api_key(server, client):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "llama", "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    server.state.api_key = "secret"
    try:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        r = httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
        assert keyed.models.list().data
        assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    finally:
        server.state.api_key = None


def test_readme_client_example_runs_against_the_server(server, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    assert "http://127.0.0.1:8000/v1" in block
    exec(compile(block.replace("http://127.0.0.1:8000/v1", server.url + "/v1"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    """`python -m serving.main` on a tiny GGUF: a stream in flight when SIGTERM arrives still ends
    with [DONE], new connections are refused, and the process exits 0."""
    import signal
    import subprocess
    import sys

    from helpers import write_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    port = free_port()
    command = [sys.executable, "-m", "serving.main", "--model", str(gguf), "--port", str(port)]
    command += ["--no-warmup", "--max-model-len", "256", "--num-kv-blocks", "64", "--max-loras", "0"]
    command += ["--cache-dir", str(tmp_path / "cache"), "--log-level", "warning", "--grace-s", "60"]
    proc = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited early"
            assert time.monotonic() < deadline, "no /health"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # served as its file name: a response never shows an absolute path
        body = {"model": gguf.name, "prompt": "the cat", "max_tokens": 120, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.Client(timeout=120) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    if len(lines) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]" and len(lines) > 3
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# --- the schema, fuzzed ----------------------------------------------------------------------
FUZZ_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
)


def test_schemathesis_finds_no_server_error_and_every_answer_conforms(server, tmp_path):
    """schemathesis (its CLI: the pytest plugin does not run under pytest 9) over every operation
    of the live schema, coverage and fuzzing phases, valid and invalid inputs, generation kept
    tiny (tests/schemathesis_hooks.py caps max_tokens): no 5xx, every invalid input refused
    with 4xx, and every status, content type and body one the schema declares. The server is
    healthy after it."""
    pytest.importorskip("schemathesis")
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json"),
        *("--phases", "coverage,fuzzing", "--max-examples", "10", "--seed", "20261204", "--workers", "1"),
        *("--checks", ",".join(FUZZ_CHECKS), "--generation-deterministic"),
        *("--request-timeout", "60"),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert server.engine.readiness()["status"] == "ok"
    assert httpx.get(server.url + "/health").status_code == 200
