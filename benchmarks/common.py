"""Helpers shared by the benchmarks: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> str:
    import jax

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"on {device.platform} ({device.device_kind})"
    )


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


def config_and_workload(cls, doc: str, argv=None, exclude: tuple[str, ...] = ()):
    """A benchmark's frozen config `cls` and a `WorkloadConfig` (less the fields in `exclude`),
    both from the command line; a bad workload setting exits naming it."""
    import argparse

    from plora_jax.cli import add_dataclass_args, dataclass_from_args
    from plora_jax.serverless.workload import WorkloadConfig

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_dataclass_args(parser, cls, title=cls.__name__)
    add_dataclass_args(parser, WorkloadConfig, title="workload", exclude=exclude)
    args = parser.parse_args(argv)
    try:
        return dataclass_from_args(cls, args), dataclass_from_args(WorkloadConfig, args, exclude=exclude)
    except ValueError as e:
        raise SystemExit(f"workload: {e}") from None


def run_clients(client, concurrency: int) -> float:
    """Run `client()` on `concurrency` threads at once (closed-loop clients); returns the wall
    seconds until the last one returns."""
    import threading
    import time

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start
