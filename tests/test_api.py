"""The HTTP layer alone, over a fake engine (`fake_engine.FakeEngine`: outputs computable by
hand, driven step by step): every numeric field at its bounds, the order of refusals (401
before any parsing, 415, 413), admission counted by the API (warm-up included), cancellation on
every path a client can leave by, the log-probability budget, work refused before it is done,
OpenAI's error JSON for every failure (503 for a dead engine), and a fuzzer of request bodies
that finds no 5xx. Milliseconds each: no model, no sockets."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest
from asgi_helpers import call_app, until
from fake_engine import EOS, FakeEngine, fake_token
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plora_jax.engine.errors import EngineBusy
from plora_jax.limits import (
    INT32_MAX,
    MAX_LOGPROB_ENTRIES,
    MAX_N,
    MAX_NAME_CHARS,
    MAX_STOP_CHARS,
    MAX_TOP_K,
    SEED_BOUND,
)
from plora_jax.lora.peft import AdapterRemoved
from serving.app import ServerState, build_app
from serving.contract import ServingEngine
from serving.sources import AdapterSources

PROMPT = "hello"


def make(auto: bool = True, **state):
    engine = FakeEngine(auto=auto)
    server = ServerState(engine, "fake", **state)
    return engine, server, build_app(server)


@pytest.fixture
def api(tmp_path):
    root = tmp_path / "adapters"  # one adapter folder the load endpoint may use
    (root / "a").mkdir(parents=True)
    (root / "a" / "adapter_config.json").write_text("{}")
    engine, server, app = make(sources=AdapterSources.of([str(root)]))
    with TestClient(app) as client:
        yield engine, server, client


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "fake", "prompt": PROMPT, "max_tokens": 3, **body})


def expected_text(prompt: str, n: int) -> str:
    ids = list(prompt.encode())
    return "".join(chr(fake_token(ids, i)) for i in range(n))


def assert_error(r, status: int, param: str | None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    named = error["param"].split("[")[0] if error["param"] else None  # stop_token_ids[0] names stop_token_ids
    assert error["message"] and error["type"] and named == param, error


def test_every_engine_implements_the_contract():
    """Each method of `ServingEngine` exists on every engine with the contract's parameters (in
    order, the same names), and the attributes the app reads are there."""
    import inspect

    from plora_jax import Engine
    from serving.cluster.gateway import ClusterEngine

    assert isinstance(FakeEngine(), ServingEngine)
    methods = [n for n, v in vars(ServingEngine).items() if callable(v) and not n.startswith("_")]
    assert {"submit", "prompt_logprobs", "add_adapter", "remove_adapter", "adapters"} <= set(methods)
    for cls in (Engine, ClusterEngine, FakeEngine):
        for name in methods:
            wanted = list(inspect.signature(getattr(ServingEngine, name)).parameters)
            have = list(inspect.signature(getattr(cls, name)).parameters)
            assert have[: len(wanted)] == wanted, (cls.__name__, name, have)
    engine = FakeEngine()
    assert engine.tokenizer.max_token_chars >= 1 and engine.max_model_len > 0


def test_completions_chat_and_streams_give_the_hand_computed_text(api):
    _, _, client = api
    r = complete(client, n=2)
    assert r.status_code == 200
    assert [c["text"] for c in r.json()["choices"]] == [expected_text(PROMPT, 3)] * 2
    assert r.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    messages = [{"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"model": "fake", "messages": messages, "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["content"] == expected_text("<user>hi\n<assistant>", 2)
    with client.stream(
        "POST", "/v1/completions", json={"model": "fake", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    ) as s:
        events = [line for line in s.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[5:])["choices"][0]["text"] for e in events[:-1]) == expected_text(PROMPT, 3)


# Each numeric field: values just outside its bounds get 400 naming it; its bounds themselves are
# served (within the context, which is 256 tokens here).
OUTSIDE = [
    ("max_tokens", -1),
    ("max_tokens", INT32_MAX + 1),
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("top_p", 0),
    ("top_p", 1.01),
    ("top_k", -2),
    ("top_k", MAX_TOP_K + 1),
    ("top_k", 2**31),
    ("n", 0),
    ("n", MAX_N + 1),
    ("seed", -1),
    ("seed", SEED_BOUND),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", 2.01),
    ("presence_penalty", 2.01),
    ("repetition_penalty", 0.001),
    ("repetition_penalty", 100.01),
    ("logprobs", -1),
    ("logprobs", 21),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [INT32_MAX + 1]),
    ("stop_token_ids", [0] * 65),
    ("stop", "x" * (MAX_STOP_CHARS + 1)),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("user", "u" * 1025),
    ("model", "m" * (MAX_NAME_CHARS + 1)),
    ("prompt", [INT32_MAX + 1]),
    ("max_tokens", 10**30),
    ("temperature", 1e400),
]
INSIDE = [
    ("max_tokens", 250),
    ("temperature", 0),
    ("temperature", 2),
    ("top_p", 1e-9),
    ("top_k", -1),
    ("top_k", MAX_TOP_K),
    ("n", MAX_N),
    ("seed", 0),
    ("seed", SEED_BOUND - 1),
    ("frequency_penalty", -2),
    ("presence_penalty", 2),
    ("repetition_penalty", 0.01),
    ("repetition_penalty", 100),
    ("logprobs", 20),
    ("stop", "x" * MAX_STOP_CHARS),
    ("stop_token_ids", [0] * 64),
]


@pytest.mark.parametrize(("field", "value"), OUTSIDE)
def test_every_numeric_field_outside_its_bounds_gets_400_naming_it(api, field, value):
    _, _, client = api
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": 3, field: value}
    r = client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    expected = "model" if field == "model" else field
    assert_error(r, 400, expected)
    assert complete(client).status_code == 200  # and the next request is served


@pytest.mark.parametrize(("field", "value"), INSIDE)
def test_every_numeric_field_at_its_bounds_is_served(api, field, value):
    engine, _, client = api
    r = complete(client, **{field: value})
    assert r.status_code == 200, r.text
    params = engine.submitted[-1][1]
    if field in ("top_k", "seed", "temperature", "top_p"):
        assert getattr(params, field) == value


def test_token_ids_outside_the_vocabulary_name_the_field(api):
    _, _, client = api
    assert_error(client.post("/v1/completions", json={"model": "fake", "prompt": [1, 300]}), 400, "prompt")
    assert_error(complete(client, stop_token_ids=[EOS + 5]), 400, "stop_token_ids")


def test_refusals_come_in_order_key_then_content_type_then_size():
    """401 before the body is read (a malformed body from a client without the key is a 401,
    not a 400), then 415, then 413; the admin key alone manages adapters."""
    _, _, app = make(api_key="k", admin_api_key="admin", max_body_bytes=64)
    with TestClient(app) as client:
        bad_json = {"content-type": "application/json"}
        assert_error(client.post("/v1/completions", content=b"{nope", headers=bad_json), 401, None)
        key = {"authorization": "Bearer k"}
        r = client.post("/v1/completions", content=b'{"model": "fake"}', headers={**key, "content-type": "text/plain"})
        assert_error(r, 415, None)
        assert_error(client.post("/v1/completions", content=b'{"model": "fake"}', headers=key), 415, None)
        assert_error(client.post("/v1/completions", content=b"x" * 100, headers={**key, **bad_json}), 413, None)
        r = client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 1}, headers=key)
        assert r.status_code == 200
        unload = {"lora_name": "a"}
        assert_error(client.post("/v1/unload_lora_adapter", json=unload, headers=key), 401, None)
        r = client.post("/v1/unload_lora_adapter", json=unload, headers={"authorization": "Bearer admin"})
        assert_error(r, 404, "lora_name")  # past the gate: there is no such adapter
        charset = {**key, "content-type": "Application/JSON; charset=utf-8"}
        r = client.post("/v1/completions", content=b'{"model":"fake","prompt":"hi","max_tokens":1}', headers=charset)
        assert r.status_code == 200


def test_a_cross_site_simple_request_runs_nothing(tmp_path):
    """A browser page's no-cors POST (no Content-Type, or text/plain) reaches no handler."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    engine, _, app = make(sources=AdapterSources.of([str(tmp_path)]))
    engine.registered["a"] = tmp_path / "a"
    with TestClient(app) as client:
        for headers in ({}, {"content-type": "text/plain;charset=UTF-8"}):
            body = json.dumps({"lora_name": "a"}).encode()
            assert_error(client.post("/v1/unload_lora_adapter", content=body, headers=headers), 415, None)
            body = json.dumps({"model": "fake", "prompt": "x"}).encode()
            assert_error(client.post("/v1/completions", content=body, headers=headers), 415, None)
    assert "a" in engine.registered and not engine.submitted


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request(stream):
    """Non-streaming: cancelled as soon as the disconnect arrives (nothing is generated after);
    streaming: cancelled even when the client left before the first byte."""
    engine, _, app = make(auto=False)

    async def run():
        leave = asyncio.Event()
        if stream:
            leave.set()  # gone before the response starts
        body = {"model": "fake", "prompt": PROMPT, "max_tokens": 100, "stream": stream}
        call = asyncio.create_task(call_app(app, body, leave=leave))
        await until(lambda: engine.submitted)
        engine.step()
        leave.set()
        await call
        assert engine.cancelled == ["fake-0"] and not engine.open
        assert app.state.admission.in_flight == 0

    asyncio.run(run())


def test_admission_is_counted_by_the_api_even_while_the_engine_warms_up():
    """50 requests while the engine publishes nothing (warming): max_queue of them are accepted,
    the rest get 429 at once; as accepted ones end, room comes back."""
    engine, _, app = make(auto=False, max_queue=8)
    engine.status = "warming"

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"model": "fake", "prompt": PROMPT, "max_tokens": 1}
            engine.stats = lambda: {}  # a warming engine's snapshot says nothing about what it runs
            calls = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(50)]
            await until(lambda: sum(c.done() for c in calls) + len(engine.open) == 50)
            refused = [c.result() for c in calls if c.done()]
            accepted = [c for c in calls if not c.done()]
            assert len(refused) == 42 and all(r.status_code == 429 for r in refused)
            assert refused[0].headers["retry-after"] == "1" and refused[0].json()["error"]["type"] == "rate_limit_error"
            assert app.state.admission.in_flight == 8
            engine.step()  # the 8 finish
            assert [(await c).status_code for c in accepted] == [200] * 8
            assert app.state.admission.in_flight == 0
            late = asyncio.create_task(client.post("/v1/completions", json=body))
            await until(lambda: engine.open)  # room again: admitted, not refused
            engine.step()
            assert (await late).status_code == 200

    asyncio.run(run())


def test_the_logprob_budget_refuses_before_any_work():
    """choices x (echoed + generated tokens) x (1 + alternatives) above MAX_LOGPROB_ENTRIES is a
    400 naming the field, before anything is tokenized into the engine; at the bound it is served."""
    engine, _, app = make()
    engine.max_model_len = 4096
    prompt = "x" * 100
    per_choice = MAX_LOGPROB_ENTRIES // (16 * 16 * 21)  # tokens per choice at the bound
    with TestClient(app) as client:
        over = complete(client, prompt=[prompt] * 16, n=16, logprobs=20, max_tokens=per_choice + 1)
        assert_error(over, 400, "logprobs")
        echo = complete(client, prompt=["x" * 4000] * 8, n=16, echo=True, max_tokens=0, logprobs=20)
        assert_error(echo, 400, "logprobs")
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "n": 16, "logprobs": True}
        assert_error(client.post("/v1/chat/completions", json={**chat, "top_logprobs": 20}), 400, "top_logprobs")
        assert not engine.submitted
        at_bound = complete(client, prompt=[prompt] * 16, n=16, logprobs=20, max_tokens=per_choice)
        assert at_bound.status_code == 200 and len(engine.submitted) == 256


def test_echo_scores_come_from_the_engine_per_prompt(api):
    _, _, client = api
    r = complete(client, prompt="abc", echo=True, max_tokens=0, logprobs=2)
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["choices"][0]["text"] == "abc" and lp["token_logprobs"] == [None, -1.0, -1.0]
    assert lp["top_logprobs"] == [None, {"b": -1.0, "c": -2.0}, {"c": -1.0, "d": -2.0}]


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(api, monkeypatch):
    engine, _, client = api
    calls = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: calls.append(text) or list(text.encode()))
    assert_error(complete(client, prompt="x" * 257), 400, "prompt")
    messages = [{"role": "user", "content": "x" * 300}]
    r = client.post("/v1/chat/completions", json={"model": "fake", "messages": messages})
    assert_error(r, 400, "messages")
    assert calls == []


def test_engine_failures_are_openai_json(api, monkeypatch):
    engine, _, client = api
    messages = [{"role": "user", "content": "refuse me"}]
    assert_error(client.post("/v1/chat/completions", json={"model": "fake", "messages": messages}), 400, "messages")
    engine.dead = True
    r = complete(client)
    assert_error(r, 503, None)
    assert "cannot serve" in r.json()["error"]["message"]
    engine.dead = False
    engine.status = "failed"
    assert client.get("/health").status_code == 503
    engine.status = "stalled"
    assert client.get("/health").status_code == 503
    engine.status = "ok"

    def exploding(*_):
        raise KeyError("a bug")

    monkeypatch.setattr(engine, "submit", exploding)
    # As uvicorn: answered, then logged. Not entered: its shutdown would close the app's pools.
    quiet = TestClient(client.app, raise_server_exceptions=False)
    assert_error(complete(quiet), 500, None)
    monkeypatch.setattr(engine, "submit", lambda *_: (_ for _ in ()).throw(EngineBusy("no room")))
    assert_error(complete(client), 503, None)


def test_a_failed_request_is_500_and_one_whose_adapter_was_removed_404():
    engine, _, app = make(auto=False)

    async def run(cause):
        call = asyncio.create_task(call_app(app, {"model": "fake", "prompt": PROMPT, "max_tokens": 5}))
        await until(lambda: engine.open)
        (rid,) = engine.open
        engine.fail(rid, cause)  # as the engine's loop fails a request: its handle raises RequestFailed
        sent = await call
        return sent[0]["status"], json.loads(sent[1]["body"])["error"]

    status, error = asyncio.run(run(RuntimeError("device lost at /some/path")))
    assert status == 500 and "RuntimeError" in error["message"] and "/some/path" not in error["message"]
    status, error = asyncio.run(run(AdapterRemoved("adapter 'a' was removed")))
    assert status == 404 and error["param"] == "model"


def test_an_aborted_request_says_abort():
    engine, _, app = make(auto=False)

    async def run():
        call = asyncio.create_task(call_app(app, {"model": "fake", "prompt": PROMPT, "max_tokens": 5}))
        await until(lambda: engine.open)
        engine._cancel(next(iter(engine.open)))  # the engine shut down under it
        sent = await call
        return json.loads(sent[1]["body"])

    assert asyncio.run(run())["choices"][0]["finish_reason"] == "abort"


def test_models_show_no_absolute_path(tmp_path):
    root = tmp_path / "adapters"
    (root / "team" / "a").mkdir(parents=True)
    (root / "team" / "a" / "adapter_config.json").write_text("{}")
    _, _, app = make(sources=AdapterSources.of([str(root)]))
    with TestClient(app) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "team" / "a")})
        assert r.status_code == 200, r.text
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert cards["a"]["root"] == "team/a" and str(tmp_path) not in json.dumps(cards)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "nothing")})
        assert_error(r, 400, "lora_path")
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "bad\u0000path"})
        assert_error(r, 400, "lora_path")
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "team" / "a")})
        assert_error(r, 400, "lora_name")


# --- the fuzzer ------------------------------------------------------------------------------
FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
    "logprobs", "echo", "frequency_penalty", "presence_penalty", "repetition_penalty", "stop_token_ids",
    "ignore_eos", "user", "logit_bias", "stream_options", "messages", "top_logprobs", "max_completion_tokens",
]  # fmt: skip
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63, 1e308, -0.0]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
good = {
    "model": st.just("fake"),
    "prompt": st.one_of(
        st.text(min_size=1, max_size=30),
        st.lists(st.integers(0, 300), min_size=1, max_size=8),
        st.lists(st.text(max_size=3), min_size=60, max_size=70),  # around MAX_PROMPTS
        st.text(min_size=200, max_size=400),  # longer than the fake context
    ),
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]), "content": st.text(max_size=20)}),
        max_size=3,
    )
    | st.lists(st.just({"role": "user", "content": "hi"}), min_size=4090, max_size=4100),  # around MAX_MESSAGES
}  # fmt: skip
bodies = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(values, st.sampled_from([None]), *[good[k] for k in good]),
    max_size=8,
)


ADMIN_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "lora_name": st.one_of(values, st.text(max_size=300)),
        "lora_path": st.one_of(values, st.sampled_from(["ROOT/a", "ROOT", "ROOT/../elsewhere", "ROOT/a/../a"])),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies | ADMIN_FIELDS | values,  # not always a JSON object
    path=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
    ),
)
def test_random_bodies_never_get_a_server_error(api, body, path):
    """Valid and invalid shapes, extreme numbers, NaN and Inf, unicode, nested and long lists,
    bodies that are not objects, on every POST endpoint: never a 5xx; every refusal is OpenAI's
    error JSON, naming a field when the body is a JSON object (there is always one to blame,
    except a full queue or an adapter folder that is missing)."""
    engine, server, client = api
    if isinstance(body, dict) and isinstance(body.get("lora_path"), str):  # paths under the configured folder
        body = {**body, "lora_path": body["lora_path"].replace("ROOT", str(server.sources.folders[0]))}
    raw = json.dumps(body, allow_nan=True)  # Python's json writes NaN/Infinity: a client might too
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"]
        if isinstance(body, dict) and r.status_code != 429:
            assert error["param"], (body, r.status_code, error)
    engine.open.clear()


def test_an_echo_whose_client_leaves_stops_scoring():
    """The engine scores a prompt chunk by chunk; when the client leaves, it stops at the next
    chunk (told through the cancel event) and the admission is released."""
    import threading

    engine, _, app = make()
    engine.hold_scoring = threading.Event()

    async def run():
        leave = asyncio.Event()
        body = {"model": "fake", "prompt": [PROMPT, PROMPT], "echo": True, "max_tokens": 0, "logprobs": 1}
        call = asyncio.create_task(call_app(app, body, leave=leave))
        await until(lambda: app.state.admission.in_flight == 2)  # admitted, scoring the first prompt
        leave.set()
        await call
        engine.hold_scoring.set()  # the scoring thread goes on: it sees the cancel
        await until(lambda: engine.scoring_cancelled == 1)
        assert app.state.admission.in_flight == 0

    try:
        asyncio.run(run())
    finally:
        engine.hold_scoring.set()  # never leave the scoring thread blocked


def test_tokenization_past_its_queue_gets_429():
    """Rendering and tokenizing happen before admission, in their own pool: when MAX_TOKENIZING
    requests wait for it, the next one gets 429 (they never hold up admitted requests' answers)."""
    import threading

    from plora_jax.limits import MAX_TOKENIZING

    engine, _, app = make()
    release = threading.Event()
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text: release.wait() and encode(text)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"model": "fake", "prompt": PROMPT, "max_tokens": 1}
            calls = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(MAX_TOKENIZING)]
            generate = app.state.generation
            await until(lambda: generate.tokenizing == MAX_TOKENIZING)
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 429 and "tokenized" in r.json()["error"]["message"]
            release.set()
            assert [(await c).status_code for c in calls] == [200] * MAX_TOKENIZING

    try:
        asyncio.run(run())
    finally:
        release.set()  # never leave the tokenizing threads blocked


def test_names_resolved_from_a_store_are_bounded_and_a_missing_one_is_remembered():
    """--adapter-source over the fake engine: a name the store lacks is asked once, then 404
    from memory for a while; past MAX_RESOLVING names in flight, a new name gets 429; the
    fetches in flight complete and serve."""
    from plora_jax.limits import MAX_RESOLVING
    from plora_jax.lora.node_cache import AdapterNotFound

    engine, _, app = make(sources=AdapterSources.of([], "s3://bucket/loras/{name}"))
    asked: list[str] = []
    release = threading.Event()

    def add_adapter(name, path, timeout=None):
        asked.append(name)
        if name.startswith("missing"):
            raise AdapterNotFound(f"{name}: no adapter at {path}")
        assert release.wait(30)
        engine.registered[name] = Path(str(path).replace("s3://", "/store/"))
        return {"name": name}

    engine.add_adapter = add_adapter

    async def run():
        for _ in range(3):  # the store is asked once
            sent = await call_app(app, {"model": "missing-1", "prompt": PROMPT, "max_tokens": 2})
            assert sent[0]["status"] == 404 and json.loads(sent[1]["body"])["error"]["code"] == "model_not_found"
        assert asked == ["missing-1"]
        calls = [
            asyncio.create_task(call_app(app, {"model": f"lora-{i}", "prompt": PROMPT, "max_tokens": 2}))
            for i in range(MAX_RESOLVING)
        ]
        await until(lambda: len(asked) == 1 + MAX_RESOLVING)  # every fetch is in the store's hands
        over = await call_app(app, {"model": "lora-extra", "prompt": PROMPT, "max_tokens": 2})
        assert over[0]["status"] == 429 and b"being fetched" in over[1]["body"]
        release.set()
        for sent in await asyncio.gather(*calls):
            assert sent[0]["status"] == 200, sent
        assert "lora-extra" not in asked

    asyncio.run(run())
