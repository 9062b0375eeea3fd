"""`python -m serving.cluster --model llama --min-replicas 0 --max-replicas N --adapter-dir DIR`.

Starts a local Ray instance (`--address local`, the default) or joins a running cluster
(`--address auto`), deploys the application of `serving.cluster.app` and serves the OpenAI API
on 127.0.0.1:8000 by default. Every `ClusterConfig` and `EngineConfig` field is a flag.
SIGTERM or Ctrl-C shuts Serve down with the local Ray instance (on a running cluster, deletes
only this application) and exits 0. On a cluster where Serve already runs, its HTTP proxy keeps
the host and port it was started with.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from plora_jax.cli import add_dataclass_args, dataclass_from_args
from plora_jax.config import EngineConfig

from .app import ClusterConfig, start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.cluster", description=__doc__.splitlines()[0])
    add_dataclass_args(parser, ClusterConfig, title="cluster")
    add_dataclass_args(parser, EngineConfig, title="engine (each replica)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = dataclass_from_args(ClusterConfig, args)
        engine_config = dataclass_from_args(EngineConfig, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    import ray
    from ray import serve

    start(config, engine_config)
    logging.getLogger("serving.cluster").info(
        "serving %s on http://%s:%d/v1 (routing=%s)", engine_config.model, config.host, config.port, config.routing
    )
    stop.wait()
    if config.address == "local":
        serve.shutdown()  # this process started Ray and Serve: stop both
    else:
        serve.delete(config.app_name)  # a shared cluster: remove only this application
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
