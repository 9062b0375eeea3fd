"""The OpenAI-compatible HTTP API over one `Engine` (FastAPI).

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events in
OpenAI's chunk format ending with `data: [DONE]`), GET /v1/models (the base model and every
adapter, with rank and residency), POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(vLLM's bodies; paths must lie inside a configured adapter folder), GET /health and GET
/metrics (Prometheus).

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
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plora_jax.engine.outputs import RequestFailed, RequestOutput
from plora_jax.lora.peft import AdapterError

from .metrics import ServerMetrics
from .protocol import (
    ApiError,
    EchoedPrompt,
    GenerationRequest,
    chunk,
    fit_max_tokens,
    new_id,
    parse_request,
    prompt_logprobs,
    response,
    usage_chunk,
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


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="P-LoRA", version="0.1.0")
    metrics = ServerMetrics(state.engine)
    app.state.plora = state
    app.state.metrics = metrics
    engine = state.engine

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        status = e.status_code
        return _error(ApiError(status, str(e.detail) if status != 404 else "no such endpoint"))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {state.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    async def json_body(request: Request):
        limit = state.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        raw = bytearray()
        async for part in request.stream():  # a body sent without a length is cut off at the limit too
            raw += part
            if len(raw) > limit:
                raise too_large
        try:
            return json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None

    def resolve_model(name: str) -> str | None:
        if name == state.model_name:
            return None
        if engine.has_adapter(name):
            return name
        raise ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")

    @app.get("/health")
    async def health():
        # 503 while the engine builds its smallest set of executables, 200 once it can serve
        # (the other sizes may still be compiling in the background: `compiled` < `total`).
        readiness = engine.readiness()
        return JSONResponse(readiness, status_code=200 if readiness["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
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

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        authorize(request)
        body = await json_body(request)
        name, path = (body.get("lora_name"), body.get("lora_path")) if isinstance(body, dict) else (None, None)
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "'lora_name' and 'lora_path' are required strings")
        resolved = inside_roots(path)
        try:
            engine.add_adapter(name, resolved)
        except (AdapterError, ValueError) as e:
            raise ApiError(400, str(e), "lora_path") from None
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        authorize(request)
        body = await json_body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'lora_name' is a required string", "lora_name")
        if not engine.has_adapter(name):
            raise ApiError(404, f"the adapter '{name}' does not exist", "lora_name", "model_not_found")
        engine.remove_adapter(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    async def generate(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        authorize(request)
        body = await json_body(request)
        req = parse_request(body, chat, lambda messages: engine.tokenizer.apply_chat_template(messages))
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
        rid, token_text = new_id(chat), lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)
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
            raise ApiError(400, str(e)) from None
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
                echo.logprobs, echo.top_logprobs = prompt_logprobs(
                    logits, echo.ids, req.params.temperature, req.params.top_logprobs
                )
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
                if event.text:
                    yield _sse(chunk(req, rid, created, index, event.text, None))
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

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
