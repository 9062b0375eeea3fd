"""What every HTTP request passes before a handler, or any parser, sees it (ASGI middleware).

In this order, each refusal OpenAI's error JSON:

1. The API key (401), for every route under /v1/, before a byte of the body is read: an
   unauthenticated client cannot make the server parse anything. Adapter management
   (`ADMIN_PATHS`) takes the admin key when one is set, so an inference key cannot unload
   another tenant's adapter.
2. POST bodies must say `Content-Type: application/json` (415). A web page can send a
   cross-site POST without a preflight only as a "simple" request (text/plain, a form, or no
   content type at all); requiring JSON makes every such request fail here, so a page a
   developer visits cannot load, unload or run anything on a server on their machine.
3. The body size (413): a declared length over the limit at once, an undeclared one as soon as
   it passes the limit; nothing is parsed before.

The body read here is then replayed to the app; after it, `receive` is the client's own, so a
handler can still watch for the client going away.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi.responses import JSONResponse

from .protocol import ApiError

ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json"


class RequestGate:
    """`key_for(path)`: the key a /v1 path needs (None: open); `limit_of()`: the body limit in bytes."""

    def __init__(self, app, key_for: Callable[[str], str | None], limit_of: Callable[[], int]):
        self.app, self.key_for, self.limit_of = app, key_for, limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self._refuse(scope["path"], scope["method"], headers)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.limit_of()
        too_large = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await error_response(too_large)(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: the client's own (its disconnect, which handlers watch for)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _refuse(self, path: str, method: str, headers: dict) -> ApiError | None:
        if path.startswith("/v1/"):
            key = self.key_for(path)
            sent = headers.get(b"authorization", b"")
            if key is not None and not hmac.compare_digest(sent, f"Bearer {key}".encode()):
                which = "admin API key" if path in ADMIN_PATHS else "API key"
                message = f"missing or wrong {which} (send 'Authorization: Bearer <key>')"
                return ApiError(401, message, code="invalid_api_key")
        if method == "POST" and not _is_json(headers.get(b"content-type", b"")):
            return ApiError(
                415,
                "the request body must be JSON, sent with 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        return None
