"""`reactive`: S-LoRA as released. An adapter is loaded when a request needing it is admitted and
its pages are freed as soon as no running request uses it; nothing is loaded ahead of demand.
Loads are still asynchronous here (other requests keep decoding while one loads); this is also
what the engine falls back to when another policy fails."""

from __future__ import annotations

from .base import Policy


class Reactive(Policy):
    name = "reactive"
    free_when_unused = True
