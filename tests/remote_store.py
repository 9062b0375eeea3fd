"""Stores on 127.0.0.1 for the tests: moto's standalone S3 server and the throttling proxy
(`benchmarks.stores`, shared with the replay benchmark), and a plain HTTP server."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.stores import S3Server, ThrottledProxy, free_port

__all__ = ["HttpServer", "S3Server", "ThrottledProxy", "free_port"]


class HttpServer:
    """A plain HTTP server of a folder (no ranges, no ETag: Last-Modified and sizes only)."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
