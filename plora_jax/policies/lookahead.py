"""`lookahead`: S-LoRA's `--prefetch`. At every arrival and interval, the adapters of requests
waiting in the queue are prefetched in queue order, so an adapter loads while its request waits
behind others instead of after it reaches the head. Queued adapters rank above every other for
eviction; the rest are evicted least recently used first."""

from __future__ import annotations

from .base import Decision, Policy, PoolView


class Lookahead(Policy):
    name = "lookahead"

    def decide(self, view: PoolView) -> Decision:
        wanted = list(dict.fromkeys(view.queued))  # queue order, each adapter once
        return Decision(
            device=[name for name in wanted if name not in view.on_device],
            priority=dict.fromkeys(wanted, 1.0),
        )
