"""Driving an ASGI app as uvicorn does, without sockets: the body, then (when the test says so)
the client's disconnect; and waiting on an explicit condition instead of a fixed sleep."""

from __future__ import annotations

import asyncio
import json


async def call_app(app, body: dict, path: str = "/v1/completions", leave: asyncio.Event | None = None) -> list[dict]:
    """Call the app as uvicorn would: the body, then (when `leave` is set) the client's disconnect."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if leave is not None:
            await leave.wait()
        else:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }
    await app(scope, receive, send)
    return sent


async def until(condition) -> None:
    """Yield to the event loop (and the worker threads) until `condition()` holds."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")
