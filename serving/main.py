"""The OpenAI-compatible server: `python -m serving.main --model llama`.

Loads the model, starts one engine and serves the API of `serving.app` with uvicorn on
127.0.0.1:8000 by default, registering the adapters given with `--adapter NAME=PATH` and
`--adapter-dir DIR`. The server listens while the engine warms up: /health answers 503
`{"status": "warming", "compiled": k, "total": n}` until the smallest set of executables that
serves any request is built (or loaded from the executable cache), then 200; the remaining
sizes are built in the background. Requests sent earlier wait for the first step. Every
`EngineConfig` field is a flag, generated from the dataclass, as are the server's own
(`ServerConfig`). SIGTERM or Ctrl-C stops accepting connections, lets requests in flight finish
for up to `--grace-s` seconds, closes the engine and exits 0.

If the engine dies (its loop stopped on a device or programming error), every request gets a
503 and the process exits 1 within a second, so a supervisor restarts it
(`--no-exit-on-engine-failure` keeps it up, answering 503, for a supervisor that probes
/health instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from plora_jax.cli import add_dataclass_args, dataclass_from_args
from plora_jax.config import EngineConfig

from .sources import AdapterSources, check_template


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to bind (0.0.0.0 exposes the server to the network)
    port: int = 8000
    adapter: tuple[str, ...] = ()  # NAME=PATH of a PEFT adapter folder (repeatable)
    adapter_dir: tuple[
        str, ...
    ] = ()  # a folder or store prefix (s3://...) of adapters; load_lora_adapter paths lie in one
    adapter_source: str = ""  # where an unknown model name is fetched from on first use, e.g. s3://bucket/loras/{name}
    served_model_name: str = ""  # the base model's name in the API ("": --model, or its file name for a path)
    max_queue: int = 256  # waiting requests beyond which new ones get 429
    max_body_mb: float = 8.0  # request bodies larger than this get 413
    api_key: str | None = None  # if set, /v1 requires "Authorization: Bearer <key>"
    admin_api_key: str | None = None  # if set, loading and unloading adapters requires this key (not --api-key)
    log_level: str = "info"
    grace_s: float = 30.0  # seconds in-flight requests may take to finish after SIGTERM
    exit_on_engine_failure: bool = True  # exit 1 when the engine dies, so a supervisor restarts the server

    def __post_init__(self):
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        if self.adapter_source:
            check_template(self.adapter_source)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb}")


_REPEATABLE = ("adapter", "adapter_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.main", description=__doc__.splitlines()[0])
    add_dataclass_args(parser, ServerConfig, exclude=_REPEATABLE, title="server")
    group = parser.add_argument_group("adapters")
    group.add_argument(
        "--adapter", dest="adapter", action="append", default=[], help="NAME=PATH or NAME=URI (repeatable)"
    )
    group.add_argument("--adapter-dir", dest="adapter_dir", action="append", default=[], help="DIR or URI (repeatable)")
    add_dataclass_args(parser, EngineConfig, title="engine")
    return parser


def register_adapters(engine, config: ServerConfig) -> AdapterSources:
    """Register --adapter and --adapter-dir adapters; returns where load_lora_adapter may load from."""
    for spec in config.adapter:
        name, _, path = spec.partition("=")
        engine.add_adapter(name, path)
    for folder in config.adapter_dir:
        result = engine.add_adapter_dir(folder)
        for name, why in result["errors"].items():
            logging.getLogger("serving").warning("adapter %r refused: %s", name, why)
    return AdapterSources.of(list(config.adapter_dir), config.adapter_source)


def served_name(config: ServerConfig, model: str) -> str:
    """The base model's name in the API: never an absolute path (a path's file or folder name)."""
    if config.served_model_name:
        return config.served_model_name
    path = Path(model).expanduser()
    # A path (here, or on another node of a cluster) is shown by its last part; a name as it is.
    return path.name if path.exists() or path.is_absolute() or "/" in model or "\\" in model else model


def _exit_when_dead(engine, server, log: logging.Logger, failed: list) -> None:
    """Tell uvicorn to stop once the engine has died (its failures delivered first)."""
    engine.core.died.wait()
    log.error("the engine died (%s); stopping the server so that it can be restarted", engine.core.fatal)
    failed.append(True)
    server.should_exit = True


def _announce_ready(engine, start: float, log: logging.Logger) -> None:
    from plora_jax.engine.api import freeze_heap

    try:
        engine.wait_ready()
        freeze_heap()
        log.info("ready to serve %.1fs after start (%s)", time.perf_counter() - start, engine.readiness())
    except RuntimeError as e:
        log.error("%s", e)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from plora_jax import Engine

    from .app import ServerState, build_app

    args = build_parser().parse_args(argv)
    try:
        server_config = dataclass_from_args(
            ServerConfig, args, exclude=_REPEATABLE, adapter=tuple(args.adapter), adapter_dir=tuple(args.adapter_dir)
        )
        engine_config = dataclass_from_args(EngineConfig, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=server_config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("serving")
    failed: list = []  # set by the watchdog when the engine died
    start = time.perf_counter()
    engine = Engine.from_pretrained(**dataclasses.asdict(engine_config), wait_ready=False)
    log.info(
        "model loaded in %.1fs; warming up %d executables", time.perf_counter() - start, engine.readiness()["total"]
    )
    threading.Thread(target=_announce_ready, args=(engine, start, log), daemon=True).start()
    try:
        roots = register_adapters(engine, server_config)
        state = ServerState(
            engine,
            served_name(server_config, engine_config.model),
            roots,
            server_config.api_key,
            server_config.max_queue,
            int(server_config.max_body_mb * 2**20),
            server_config.admin_api_key,
        )
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the
        # handler it found installed; this one lets main() close the engine and exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(state),
                host=server_config.host,
                port=server_config.port,
                log_level=server_config.log_level,
                timeout_graceful_shutdown=server_config.grace_s,
            )
        )
        if server_config.exit_on_engine_failure:
            args = (engine, server, log, failed)
            threading.Thread(target=_exit_when_dead, args=args, name="plora-watchdog", daemon=True).start()
        server.run()
    finally:
        engine.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
