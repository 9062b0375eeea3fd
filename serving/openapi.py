"""What `/openapi.json` says beyond FastAPI's defaults: every error an endpoint answers (always
`ErrorResponse`), the server-sent events of a stream, and no 422 (validation errors are 400)."""

from __future__ import annotations

from fastapi import FastAPI

from .schema import ChatCompletionChunk, CompletionChunk, ErrorResponse

# Every error an endpoint may answer, in the schema (the body is always `ErrorResponse`).
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 500, 503)}
ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 500, 503)}
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
_STREAMED = "With `stream`: server-sent events, each `data:` a {} (an `ErrorResponse` if it fails), then `[DONE]`."
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


def generation_responses(model, chunk_model) -> dict:
    schema = _event_schema(chunk_model)
    return {
        200: {
            "model": model,
            "description": _STREAMED.format(chunk_model.__name__),
            "content": {"text/event-stream": {"schema": schema}},
        },
        **ERRORS,
    }


def with_chunk_schemas(app: FastAPI):
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
