"""Counting XLA compilations, per thread, through jax.monitoring's backend-compile event.

Counting events by the thread that emits them gives a per-engine count even when several
engines share a process: after warm-up an engine compiles only on its loop thread (warm-up
itself runs on the compile plan's threads, which the plan counts on its own). The listener is
registered once per process.
"""

from __future__ import annotations

import threading
from collections import Counter

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_counts: Counter[int] = Counter()
_lock = threading.Lock()
_registered = False


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
        with _lock:
            _counts[threading.get_ident()] += 1


def install() -> None:
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True


def compiles_on_thread(ident: int | None = None) -> int:
    """Backend compiles so far on thread `ident` (default: the calling thread)."""
    install()
    with _lock:
        return _counts[threading.get_ident() if ident is None else ident]
