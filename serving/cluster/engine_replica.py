"""LoraEngine: one Ray Serve replica holding one `Engine` (the base model loaded once).

Serve's model multiplexing keys each request by its adapter id. Here the multiplexed loader
only *registers* the adapter in the engine (its config and tensor header are validated, its
weights read into the host tier); which adapters sit on the device, how pages are freed, and
what is loaded ahead is the engine's business (its paged pool, tiers and policy). Serve runs
the loader under its per-replica lock (ray-project/ray#65346), so a replica's first-time
registrations are read one at a time, but device loads and every later request for a
registered adapter never wait on that lock. Serve's registration cap is unlimited by default
(`max_adapters`: -1): evicting a registered id only makes Serve forget it, the engine keeps the
adapter, so the cap would cost re-registration and routing affinity for nothing. The baseline
arm of `benchmarks.cluster` sets it to the engine's device slots, as Serve's own LRU would.

The replica reports what the router and the autoscaler need: `record_routing_stats` returns
the adapters on its device and in its host memory, its queue depth and free adapter pages
(read from the engine's published snapshot, never waiting for the loop), and publishes the
engine's gauges under the same names as `/metrics` of the single-engine server, tagged by
replica (`ray.serve.metrics`, exported on Ray's metrics port). `prefetch` is the forecaster's
pre-load: tagged with the adapter id, it registers the adapter (so Serve advertises the id
from this replica) and starts its transfer to the device before any request asks.

Health: `check_health` (which Serve calls every few seconds) raises while the engine is not
serving, its loop dead or one step hung past `step_timeout_s`, so Serve replaces the replica and
routers stop sending it traffic. Bounded state: a replica keeps at most `max_registered`
adapters registered; registering one more unregisters the least recently requested idle ones
(their running requests finish first), so adapter churn never grows a long-lived replica.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, OrderedDict

from ray import serve
from ray.serve import metrics as serve_metrics

from plora_jax.limits import MAX_REPLICA_ADAPTERS
from serving.metrics import RESIDENCY, engine_values, tier_counts

UNUSABLE_QUEUE = 1_000_000  # the queue a replica that cannot serve reports (routers rank it last)


class ReplicaGauges:
    """`serving.metrics`' engine gauges as Ray Serve gauges (Serve adds deployment and replica tags)."""

    def __init__(self, stats: dict):
        self.gauges = {
            name: serve_metrics.Gauge(name, description=text) for name, (text, _) in engine_values(stats).items()
        }
        self.tiers = serve_metrics.Gauge(RESIDENCY[0], description=RESIDENCY[1], tag_keys=("tier",))

    def update(self, stats: dict) -> None:
        for name, (_, value) in engine_values(stats).items():
            if name in self.gauges:
                self.gauges[name].set(value)
        for tier, count in tier_counts(stats).items():
            self.tiers.set(count, tags={"tier": tier})


class LoraEngine:
    def __init__(
        self,
        model: str,
        engine_options: dict,
        max_adapters: int = -1,
        forecaster_app: str | None = None,
        max_registered: int = MAX_REPLICA_ADAPTERS,
    ):
        from plora_jax import Engine

        self.engine = Engine.from_pretrained(model, **engine_options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.max_registered = max_registered
        # Written on the replica's event loop only: adapter id -> folder, least recently requested
        # first, and the requests of each id in flight here (an id with some is never evicted).
        self.paths: OrderedDict[str, str] = OrderedDict()
        self.active: Counter = Counter()

        async def register(adapter: str) -> str:
            if not self.engine.has_adapter(adapter):
                for oldest in self._evicted():
                    if self.engine.has_adapter(oldest):  # its running requests finish on the old pages
                        await asyncio.to_thread(self.engine.remove_adapter, oldest)
                await asyncio.to_thread(self.engine.add_adapter, adapter, self.paths[adapter])
            return adapter

        self._register = register
        # Wired at init so the cap is configuration (Serve detects multiplexing on the instance).
        self.register = serve.multiplexed(max_num_models_per_replica=max_adapters)(register)
        self.gauges = ReplicaGauges(self.engine.stats())
        # The Forecaster that hears this replica's residency (None: Serve's default routing).
        self.forecaster = None if forecaster_app is None else serve.get_deployment_handle("Forecaster", forecaster_app)

    async def _ensure(self, adapter: str | None, path: str | None) -> None:
        if adapter:
            if path is None:
                raise ValueError(f"adapter {adapter!r} came without its folder")
            self.paths.setdefault(adapter, path)
            self.paths.move_to_end(adapter)
            await self.register(adapter)
            if not self.engine.has_adapter(adapter):  # evicted here while Serve's cache still lists it
                await self._register(adapter)

    def _evicted(self) -> list[str]:
        """The least recently requested adapters past `max_registered` with no request in flight
        here, dropped from `paths`."""
        idle = [a for a in self.paths if not self.active[a]][: max(0, len(self.paths) - self.max_registered)]
        for adapter in idle:
            del self.paths[adapter]
        return idle

    def check_health(self) -> None:
        """Serve's health check: raise unless the engine serves (warming up counts as serving)."""
        readiness = self.engine.readiness()
        if readiness["status"] in ("failed", "stalled"):
            raise RuntimeError(f"the engine is {readiness['status']}: {readiness.get('detail', '')}")

    async def generate(self, prompt_ids: list[int], params, adapter: str | None = None, path: str | None = None):
        """Stream the request's `StreamEvent`s; a cancelled stream cancels the request."""
        self.active[adapter] += 1
        try:
            await self._ensure(adapter, path)
            handle = self.engine.submit(prompt_ids, params, adapter)
            try:
                async for event in handle.events():
                    yield event
            finally:
                handle.cancel()  # a no-op once finished; frees the KV blocks and pin of an abandoned one
        finally:
            self.active[adapter] -= 1
            if not self.active[adapter]:
                del self.active[adapter]

    async def prefetch(self, adapter: str, path: str, spread: bool = False, keep: tuple[str, ...] = ()) -> dict:
        """Register `adapter` and start loading it onto the device, evicting none of `keep`
        (the router picked this replica; `spread` is the router's concern). Returns where it now is."""
        self.active[adapter] += 1  # not evicted while it is being pre-loaded
        try:
            await self._ensure(adapter, path)
            residency = await asyncio.to_thread(self.engine.prefetch, adapter, keep)
        finally:
            self.active[adapter] -= 1
            if not self.active[adapter]:
                del self.active[adapter]
        return {"replica": self.replica, "adapter": adapter, "residency": residency}

    def describe(self) -> dict:
        """This replica's identity and residency (tests and benchmarks read it)."""
        stats = self.engine.stats()
        return {"replica": self.replica, **self.record_routing_stats(), "stats": stats}

    def record_routing_stats(self) -> dict:
        stats = self.engine.stats()
        self.gauges.update(stats)
        free = stats.get("adapter_pages_total", 0) - stats.get("adapter_pages_used", 0)
        serving = self.engine.readiness()["status"] in ("ok", "warming")
        report = {
            "device": sorted(self.engine.resident_adapters()) if serving else [],
            "host": sorted(self.engine.host_adapters()) if serving else [],
            # A replica whose engine died or hangs ranks last until Serve replaces it.
            "queue": stats["waiting"] + stats["running"] if serving else UNUSABLE_QUEUE,
            "pid": os.getpid(),  # with the replica id: which process to look at (or, in a test, kill)
            "free_pages": free,
            "cold_starts": stats.get("cold_starts", 0),
            "device_hits": stats.get("device_hits", 0),
        }
        if self.forecaster is not None:
            self.forecaster.report.remote(self.replica, report)  # not awaited: a report, not a call
        return report

    def record_autoscaling_stats(self) -> dict:
        stats = self.engine.stats()
        return {"queue": stats["waiting"] + stats["running"], "cold_starts": stats.get("cold_starts", 0)}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
