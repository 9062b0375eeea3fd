"""`slora` and `slora_prefetch`: S-LoRA as released (Sheng et al., MLSys'24), the baselines the
claims are taken against.

S-LoRA reads every adapter into host memory when it starts, so a cold start is one copy from
host to device. An adapter is placed when a request needing it is admitted, and the whole
batch waits for that copy (synchronous loads). Its memory is freed as soon as no running or
waiting request uses it; S-LoRA's one memory pool then gives it to the KV cache. `slora_prefetch` is
its `--prefetch`: the adapters of the requests waiting in the queue load ahead of their
admission, while demand loads stay synchronous.

Here `decide` asks for every registered adapter in the host cache (as far as its budget goes;
with `SimConfig.adapters_on_host` they are all there at t=0), `free_when_unused` frees, and
`sync_loads` makes the engine's loads synchronous. Run it with
`EngineConfig.adapter_memory="unified"` for S-LoRA's one memory pool; with a separate pool it
is given memory S-LoRA would not have.
"""

from __future__ import annotations

from .base import Decision, Policy, PoolView, rank_to_fit
from .lookahead import Lookahead


def every_adapter_on_host(view: PoolView) -> list[str]:
    """The registered adapters not in the host cache, in registration order, that fit what the
    host cache has left."""
    used = sum(view.adapter_bytes.get(n, 0) for n in view.on_host)
    missing = [n for n in view.registered if n not in view.on_host]
    return rank_to_fit(missing, view, view.host_bytes - used, len(missing))


class Slora(Policy):
    name = "slora"
    free_when_unused = True
    sync_loads = True

    def decide(self, view: PoolView) -> Decision:
        return Decision(host=every_adapter_on_host(view))


class SloraPrefetch(Lookahead):
    name = "slora_prefetch"
    free_when_unused = True
    sync_loads = True

    def decide(self, view: PoolView) -> Decision:
        decision = super().decide(view)
        decision.host = every_adapter_on_host(view)
        return decision
