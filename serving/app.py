"""The OpenAI-compatible HTTP API over one engine (FastAPI).

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events in
OpenAI's chunk format ending with `data: [DONE]`), GET /v1/models (the base model and every
adapter, with rank and residency), POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(vLLM's bodies; paths must lie inside a configured adapter folder), GET /health and GET
/metrics (Prometheus).

The app is written against `serving.contract.ServingEngine`, which the single engine, the Ray
Serve gateway and the tests' fake engine implement. Its pieces:

- `gate.RequestGate`: the API key (the admin key for adapter management) before any body is
  read, JSON-only POST bodies (415), the body-size limit (413);
- `generation.Generation`: completions and chat, in the order that keeps one request's work its
  own (tokenization off the event loop, budgets, admission, cancellation on every path);
- here: the routes, the adapter endpoints (file reads in a worker thread) and the mapping of
  every error to OpenAI's error JSON: 400 bad input (naming the field), 401, 404 unknown model,
  413, 415, 429 full queue, 500 an engine failure, 503 a dead, closed or busy engine. /health
  is 200 only while the engine serves (`warming`, `stalled` and `failed` are 503).

Responses carry no absolute path: an adapter's `root` is its folder relative to the adapter
folder it lies in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from plora_jax.engine.errors import EngineBusy, EngineDead
from plora_jax.lora.node_cache import SourceUnavailable
from plora_jax.lora.peft import AdapterError

from .contract import ServingEngine
from .gate import ADMIN_PATHS, RequestGate, error_response
from .generation import Admission, Generation
from .metrics import ServerMetrics
from .openapi import ADMIN_ERRORS, ERRORS, TEXT, generation_responses, with_chunk_schemas
from .protocol import ApiError
from .schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Health,
    LoadLoraRequest,
    ModelList,
    UnloadLoraRequest,
    describe_error,
)
from .sources import ENGINE_CALL_S, AdapterSources, Resolver

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: ServingEngine
    model_name: str  # the base model's name in `model` fields
    sources: AdapterSources = field(default_factory=AdapterSources)  # where load_lora_adapter paths may lie
    api_key: str | None = None
    max_queue: int = 256  # choices waiting beyond those the engine runs, past which requests get 429
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413 (read no further)
    admin_api_key: str | None = None  # adapter management's key (None: the API key)

    def key_for(self, path: str) -> str | None:
        if path in ADMIN_PATHS and self.admin_api_key is not None:
            return self.admin_api_key
        return self.api_key


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        generate.close()
        resolver.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="P-LoRA", version="0.1.0", separate_input_output_schemas=False, lifespan=lifespan)
    app.openapi = with_chunk_schemas(app)
    app.add_middleware(RequestGate, key_for=state.key_for, limit_of=lambda: state.max_body_bytes)
    engine = state.engine
    admission = Admission(lambda: state.max_queue, lambda: int(engine.stats().get("running", 0)))
    metrics = ServerMetrics(engine, lambda: admission.in_flight)
    resolver = Resolver(engine, state.sources)
    generate = Generation(engine, state.model_name, metrics, admission, lambda: state.max_queue, resolver)
    app.state.plora, app.state.metrics, app.state.admission, app.state.generation = state, metrics, admission, generate
    _error_handlers(app)
    _adapter_routes(app, state)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        readiness = engine.readiness()
        return JSONResponse(dict(readiness), status_code=200 if readiness["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    completions = generation_responses(CompletionResponse, CompletionChunk)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=completions)
    async def complete(body: CompletionRequest, request: Request):
        return await generate(body, request)

    chat = generation_responses(ChatCompletionResponse, ChatCompletionChunk)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=chat)
    async def chat_complete(body: ChatCompletionRequest, request: Request):
        return await generate(body, request)

    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error JSON with its status."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError):
        message, param = describe_error(e.errors()[0])
        return error_response(ApiError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        status = e.status_code
        return error_response(ApiError(status, str(e.detail) if status != 404 else "no such endpoint"))

    @app.exception_handler(EngineDead)
    async def engine_dead(_: Request, e: EngineDead):
        # The kind of failure only: an engine's internal error may name its files (the log has it).
        why = f"its loop stopped ({type(e.__cause__).__name__})" if e.__cause__ is not None else "it is closed"
        return error_response(ApiError(503, f"the engine cannot serve: {why}", code="engine_unavailable"))

    @app.exception_handler(EngineBusy)
    async def engine_busy(_: Request, e: EngineBusy):
        return error_response(ApiError(503, str(e), code="engine_busy"))

    @app.exception_handler(TimeoutError)
    async def engine_slow(_: Request, e: TimeoutError):
        return error_response(ApiError(503, f"the engine did not answer in time ({e}); retry later"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        log.error("unexpected error answering a request", exc_info=e)
        return error_response(ApiError(500, f"internal error ({type(e).__name__})"))


def _adapter_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models():
        created = int(time.time())
        data = [{"id": state.model_name, "object": "model", "created": created, "owned_by": "plora", "root": None}]
        for a in await asyncio.to_thread(engine.adapters, ENGINE_CALL_S):
            card = {"id": a["name"], "object": "model", "created": created, "owned_by": "plora"}
            card |= {"root": state.sources.display(a["path"]), "parent": state.model_name}
            data.append(card | {"rank": a["rank"], "residency": a["residency"]})
        return {"object": "list", "data": data}

    def load(name: str, path: str) -> None:  # in a worker thread: it reads (or fetches) the adapter's files
        resolved = state.sources.confine(path)
        if engine.has_adapter(name):
            raise ApiError(400, f"adapter name {name!r} is already registered", "lora_name")
        try:
            engine.add_adapter(name, resolved, ENGINE_CALL_S)
        except SourceUnavailable as e:
            raise ApiError(503, str(e), "lora_path") from None
        except AdapterError as e:
            raise ApiError(400, str(e), "lora_name" if e.field == "name" else "lora_path") from None

    admin = dict(response_model=None, responses={200: TEXT, **ADMIN_ERRORS})

    @app.post("/v1/load_lora_adapter", **admin)
    async def load_lora(body: LoadLoraRequest):
        await asyncio.to_thread(load, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", **admin)
    async def unload_lora(body: UnloadLoraRequest):
        name = body.lora_name
        missing = ApiError(404, f"the adapter '{name}' does not exist", "lora_name", "model_not_found")
        if not engine.has_adapter(name):
            raise missing
        try:
            await asyncio.to_thread(engine.remove_adapter, name, ENGINE_CALL_S)
        except ValueError:  # removed meanwhile
            raise missing from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
