"""The OpenAI-compatible HTTP API over one `Engine` (FastAPI).

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events in
OpenAI's chunk format ending with `data: [DONE]`), GET /v1/models (the base model and every
adapter, with rank and residency), POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(vLLM's bodies; paths must lie inside a configured adapter folder), GET /health and GET
/metrics (Prometheus).

Requests, responses and stream events are the Pydantic models of `serving.schema`, so FastAPI
validates every body and `/openapi.json` documents all of it; `BodyGate` enforces the body-size
limit before any parsing, and validation errors become OpenAI's error JSON naming the field.

The handlers never block the event loop on the engine: requests are submitted (validation and
tokenization happen in the caller, which is cheap) and their events awaited through the
handle's asyncio interface. A streaming client that disconnects cancels its request, which
frees its KV blocks and adapter pin at the engine's next step. Admission control is one rule:
when `max_queue` requests already wait, a new one gets 429 with Retry-After. Errors are OpenAI's
error JSON with the status the issue asks for (404 unknown model, 400 bad parameters, an
unsupported field or malformed JSON, 401 bad key, 413 a body over `max_body_bytes`, 429 full
queue). An omitted `max_tokens` means up to the context; one larger than the context leaves
after the prompt is a 400 naming the limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plora_jax.engine.outputs import RequestFailed, RequestOutput
from plora_jax.lora.peft import AdapterError

from .metrics import ServerMetrics
from .protocol import (
    ApiError,
    EchoedPrompt,
    GenerationRequest,
    chat_logprobs,
    chunk,
    completion_logprobs,
    fit_max_tokens,
    new_id,
    parse_request,
    prompt_logprobs,
    response,
    usage_chunk,
)
from .schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    LoadLoraRequest,
    ModelList,
    UnloadLoraRequest,
    describe_error,
)

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: object
    model_name: str  # the base model's name in `model` fields
    adapter_roots: list[Path] = field(default_factory=list)  # load_lora_adapter paths must lie inside one
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413 (read no further)


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class BodyGate:
    """ASGI middleware in front of every POST: a body over the limit gets 413 before anything
    parses it (a declared length at once, an undeclared one when it passes the limit), and a
    body sent without a Content-Type is taken as JSON (some clients send none)."""

    def __init__(self, app, limit_of):
        self.app, self.limit_of = app, limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.limit_of()
        too_large = _error(ApiError(413, f"the request body is larger than the server's limit of {limit} bytes"))
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_large(scope, receive, send)
        if b"content-type" not in headers:
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: the client's disconnect, which a stream watches for
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


# Every error an endpoint answers, in the schema (the body is always `ErrorResponse`).
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)}
_STREAMED = "With `stream`: server-sent events, each `data:` a {} (an `ErrorResponse` if it fails), then `[DONE]`."


_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
_CHUNKS = (CompletionChunk, ChatCompletionChunk)  # documented as the event stream's items


def _event_schema(chunk_model) -> dict:
    """One server-sent event as OpenAPI describes it: its `data` a chunk's (or an error's) JSON,
    or the closing `[DONE]`."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk_model, ErrorResponse)]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"}},
    }


def _generation_responses(model, chunk_model) -> dict:
    schema = _event_schema(chunk_model)
    return {
        200: {
            "model": model,
            "description": _STREAMED.format(chunk_model.__name__),
            "content": {"text/event-stream": {"schema": schema}},
        },
        **_ERRORS,
    }


def _with_chunk_schemas(app: FastAPI):
    """`app.openapi` with the stream chunks' models in the components (FastAPI adds only the
    models of JSON bodies), so the event stream's `$ref`s resolve."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # FastAPI documents a 422 for every body; validation errors are answered with 400
            # and the OpenAI error JSON (declared per route), so the 422 would be a false promise.
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model in _CHUNKS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in body.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, body)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="P-LoRA", version="0.1.0", separate_input_output_schemas=False)
    app.openapi = _with_chunk_schemas(app)
    app.add_middleware(BodyGate, limit_of=lambda: state.max_body_bytes)
    metrics = ServerMetrics(state.engine)
    app.state.plora = state
    app.state.metrics = metrics
    engine = state.engine

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError):
        message, param = describe_error(e.errors()[0])
        return _error(ApiError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        status = e.status_code
        return _error(ApiError(status, str(e.detail) if status != 404 else "no such endpoint"))

    def authorize(request: Request) -> None:
        # Read at each request (the key may be set after the app is built), and not declared as
        # a security scheme: without a key, requests without one are valid.
        if state.api_key is None:
            return
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {state.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    auth = [Depends(authorize)]

    def resolve_model(name: str) -> str | None:
        if name == state.model_name:
            return None
        if engine.has_adapter(name):
            return name
        raise ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        # 503 while the engine builds its smallest set of executables, 200 once it can serve
        # (the other sizes may still be compiling in the background: `compiled` < `total`).
        readiness = engine.readiness()
        return JSONResponse(readiness, status_code=200 if readiness["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, dependencies=auth)
    async def models():
        created = int(time.time())
        data = [{"id": state.model_name, "object": "model", "created": created, "owned_by": "plora", "root": None}]
        for a in engine.adapters():
            data.append(
                {
                    "id": a["name"],
                    "object": "model",
                    "created": created,
                    "owned_by": "plora",
                    "root": str(a["path"]),
                    "parent": state.model_name,
                    "rank": a["rank"],
                    "residency": a["residency"],
                }
            )
        return {"object": "list", "data": data}

    def inside_roots(path: str) -> Path:
        resolved = Path(path).expanduser().resolve()
        if not state.adapter_roots:
            raise ApiError(400, "loading adapters at run time needs --adapter-dir (no adapter folder is configured)")
        if not any(resolved.is_relative_to(root) for root in state.adapter_roots):
            raise ApiError(400, f"lora_path {path!r} is outside the configured adapter folders", "lora_path")
        return resolved

    lora_route = dict(response_model=None, responses={200: _TEXT, **_ERRORS}, dependencies=auth)

    @app.post("/v1/load_lora_adapter", **lora_route)
    async def load_lora(body: LoadLoraRequest):
        name, path = body.lora_name, body.lora_path
        resolved = inside_roots(path)
        try:
            engine.add_adapter(name, resolved)
        except (AdapterError, ValueError) as e:
            raise ApiError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", **lora_route)
    async def unload_lora(body: UnloadLoraRequest):
        name = body.lora_name
        if not engine.has_adapter(name):
            raise ApiError(404, f"the adapter '{name}' does not exist", "lora_name", "model_not_found")
        engine.remove_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def generate(body: CompletionRequest | ChatCompletionRequest):
        chat = isinstance(body, ChatCompletionRequest)
        endpoint = "chat" if chat else "completions"
        req = parse_request(body, lambda messages: engine.tokenizer.apply_chat_template(messages))
        req.adapter = resolve_model(req.model)
        # Tokenized once here: the lengths fit max_tokens, and the engine gets the ids.
        texts = [p if isinstance(p, str) else None for p in req.prompts]
        req.prompts = [p if isinstance(p, list) else engine.tokenizer.encode(p) for p in req.prompts]
        per_prompt = [fit_max_tokens(req, len(ids), engine.max_model_len) for ids in req.prompts]
        echoed = await echo_prompts(req, texts) if req.echo else None
        choices = req.choices(per_prompt)
        if len(choices) > max(1, state.max_queue):  # could never be admitted (one choice always may be, later)
            message = f"{len(choices)} choices (prompts x n) are more than the queue holds ({state.max_queue})"
            raise ApiError(400, message, "n")
        if engine.stats()["waiting"] + len(choices) > state.max_queue:
            metrics.finished(endpoint, "429")
            raise ApiError(429, f"the waiting queue is full ({state.max_queue} requests); retry later")
        rid = new_id(chat)
        if req.score_only:  # echo with max_tokens 0: the prompts' scores are the whole answer
            outputs = [RequestOutput("", e.ids, [], "", "length", logprobs=[], top_logprobs=[]) for e in echoed]
            metrics.finished(endpoint, "200")
            return response(req, rid, [o for o in outputs for _ in range(req.n)], token_text, echoed)
        handles = []
        try:
            for prompt, params in choices:
                handles.append(engine.submit(prompt, params, req.adapter))
        except BaseException as e:  # none of the request's choices may outlive a failed submit
            for handle in handles:
                handle.cancel()
            if not isinstance(e, ValueError):
                raise
            metrics.finished(endpoint, "400")
            # the engine's messages start with the field they name (token ids, context length)
            raise ApiError(400, str(e), "prompt" if str(e).startswith("prompt") else None) from None
        if req.stream:
            return StreamingResponse(_stream(req, rid, handles, endpoint), media_type="text/event-stream")
        try:
            outputs = await asyncio.gather(*(handle.aresult() for handle in handles))
        except RequestFailed as e:
            metrics.finished(endpoint, "500")
            raise ApiError(500, str(e)) from None
        finally:
            for handle in handles:
                handle.cancel()  # a no-op once finished; frees everything if this task was cancelled
        metrics.finished(endpoint, "200", *outputs)
        return response(req, rid, outputs, token_text, echoed)

    def token_text(token: int) -> str:
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    async def echo_prompts(req: GenerationRequest, texts: list[str | None]) -> list[EchoedPrompt]:
        """Each prompt's text (as sent, or decoded from its ids) and ids, with logprobs its
        scores (the engine's scoring path, off the event loop)."""
        logits_of = getattr(engine, "logits", None)
        if logits_of is None:
            raise ApiError(400, "'echo' is not supported by this server's engine (it cannot score prompts)", "echo")
        echoed = []
        for ids, text in zip(req.prompts, texts, strict=True):
            text = text if text is not None else engine.tokenizer.decode(ids, skip_special_tokens=False)
            echo = EchoedPrompt(text, list(ids))
            if req.params.logprobs:
                try:
                    logits = await asyncio.to_thread(logits_of, ids, req.adapter)
                except ValueError as e:
                    raise ApiError(400, str(e), "prompt") from None
                temperature = 0.0 if req.params.greedy else req.params.temperature  # as the sampler scales
                top = req.params.top_logprobs
                echo.logprobs, echo.top_logprobs = prompt_logprobs(logits, echo.ids, temperature, top)
            echoed.append(echo)
        return echoed

    async def _stream(req: GenerationRequest, rid: str, handles: list, endpoint: str):
        """The choices' events merged as they come (each chunk carries its choice's index); an
        engine failure ends the stream with an error chunk, never a silent truncation."""
        created = int(time.time())
        events: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle) -> None:
            try:
                async for event in handle.events():
                    await events.put((index, event, None))
            except Exception as e:  # reported in the stream, whatever it is
                await events.put((index, None, e))

        pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        outputs: list = [None] * len(handles)
        text_offsets = [0] * len(handles)  # completions' text_offset continues across chunks
        status = "disconnected"
        try:
            if req.chat:
                for index in range(len(handles)):
                    yield _sse(chunk(req, rid, created, index, "", None, first=True))
            remaining = len(handles)
            while remaining:
                index, event, error = await events.get()
                if error is not None:
                    raise error
                if event.text or (req.params.logprobs and event.token_ids):
                    logprobs = None
                    if req.params.logprobs:
                        if req.chat:
                            logprobs = chat_logprobs(event, token_text)
                        else:
                            logprobs = completion_logprobs(event, token_text, offset=text_offsets[index])
                            text_offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    yield _sse(chunk(req, rid, created, index, event.text, None, logprobs=logprobs))
                if event.finished:
                    outputs[index] = event.output
                    remaining -= 1
                    yield _sse(chunk(req, rid, created, index, None if req.chat else "", event.output.finish_reason))
            if req.include_usage:
                yield _sse(usage_chunk(req, rid, created, outputs))
            yield "data: [DONE]\n\n"
            status = "200"
            metrics.finished(endpoint, status, *outputs)
        except Exception as e:
            status = "500"
            metrics.finished(endpoint, status)
            message = str(e) if isinstance(e, RequestFailed) else f"the stream failed: {type(e).__name__}: {e}"
            yield _sse(ApiError(500, message).body())
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
            if status == "disconnected":
                metrics.finished(endpoint, status)
            for handle in handles:
                handle.cancel()  # the client went away (or we are done): free the requests' resources

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_generation_responses(CompletionResponse, CompletionChunk),
        dependencies=auth,
    )
    async def completions(body: CompletionRequest):
        return await generate(body)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk),
        dependencies=auth,
    )
    async def chat_completions(body: ChatCompletionRequest):
        return await generate(body)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
