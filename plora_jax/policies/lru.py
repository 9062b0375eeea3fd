"""`lru`: the cache of vLLM and SGLang. Adapters are loaded on demand and stay on the device after
their requests finish; when room is needed, the least recently used unpinned adapter goes.
Nothing is loaded ahead of demand."""

from __future__ import annotations

from .base import Policy


class Lru(Policy):
    name = "lru"
