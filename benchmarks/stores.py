"""Real stores on 127.0.0.1 for tests and benchmarks: moto's standalone S3 server (moto is a
test dependency) and a throttling TCP proxy standing in for a distant store (a first-byte
latency per response, one shared link of a given bytes/s, and going away)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from pathlib import Path

KEY = SECRET = "testing"  # moto accepts any credentials


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's ThreadedMotoServer with one bucket, and what an engine needs to reach it."""

    def __init__(self, bucket: str = "loras"):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.bucket = bucket
        self.client().create_bucket(Bucket=bucket)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, url: str | None = None):
        import boto3

        return boto3.client(
            "s3", endpoint_url=url or self.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )  # fmt: skip

    def upload(self, folder: Path, prefix: str) -> str:
        """Put every file of `folder` under `prefix`; the adapter's URI."""
        for file in sorted(folder.iterdir()):
            self.client().put_object(Bucket=self.bucket, Key=f"{prefix}/{file.name}", Body=file.read_bytes())
        return f"s3://{self.bucket}/{prefix}"

    def options(self, url: str | None = None) -> str:
        """adapter_source_options for an engine reaching the store at `url` (a proxy) or directly;
        one try per request, so a store that went away fails fast."""
        s3 = {"endpoint_url": url or self.url, "key": KEY, "secret": SECRET}
        s3["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}
        s3["skip_instance_cache"] = True
        return json.dumps({"s3": s3})

    def stop(self) -> None:
        self.server.stop()


class ThrottledProxy:
    """A TCP proxy to `127.0.0.1:upstream`: each response waits `latency_s` before its first
    byte, and all responses share one link of `bytes_per_s`; `down` closes new connections."""

    def __init__(self, upstream: int, latency_s: float = 0.0, bytes_per_s: float | None = None):
        self.upstream, self.latency_s, self.bytes_per_s = upstream, latency_s, bytes_per_s
        self.down = False
        self._pace = threading.Lock()
        self._free_at = 0.0  # when the link has sent everything queued on it (one link for all connections)
        self.bytes_down = 0  # bytes sent back to clients
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        asked = threading.Event()  # a request went up since the last response began
        threading.Thread(target=self._pipe, args=(client, upstream, asked, False), daemon=True).start()
        self._pipe(upstream, client, asked, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, asked: threading.Event, down: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if not down:
                    asked.set()
                else:
                    if asked.is_set():  # the first bytes of a response: the store's latency
                        asked.clear()
                        time.sleep(self.latency_s)
                    if self.bytes_per_s:  # one link: every connection's bytes queue on it
                        with self._pace:
                            self._free_at = max(time.monotonic(), self._free_at) + len(data) / self.bytes_per_s
                            done = self._free_at
                        time.sleep(max(0.0, done - time.monotonic()))
                    self.bytes_down += len(data)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        self.sock.close()
