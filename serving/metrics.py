"""Prometheus metrics of the server, in their own registry (one per app, so tests can run several).

Request-level series are updated by the handlers as requests end; engine-level series (adapter
residency per tier, pool utilisation, cold starts, prefetch precision and recall, queue depth)
are read from `engine.stats()` (the snapshot the engine loop publishes after every step) when
/metrics is scraped, so a scrape never waits for the loop and the handlers do no extra work.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from plora_jax.metrics import (
    RESIDENCIES,
    adapter_mem_util,
    adapter_pool_fill,
    prefetch_precision,
    prefetch_recall,
    tier_prefetch,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def engine_values(stats: dict) -> dict[str, tuple[str, float]]:
    """Name -> (help, value) of the engine gauges, from an `Engine.stats()` dict: the one list
    of names, shared by this server's Prometheus collector and the Ray Serve replicas' gauges
    (`serving.cluster`). A gauge whose source field a caller's stats lack is left out."""
    values = {
        "plora_queue_depth": ("Requests waiting for admission", stats.get("waiting")),
        "plora_running_requests": ("Requests running", stats.get("running")),
        "plora_kv_blocks_used": ("KV cache blocks in use", stats.get("kv_blocks_used")),
        "plora_cold_starts": ("Requests whose adapter was not on the device", stats.get("cold_starts")),
        "plora_device_hits": ("Requests whose adapter was on the device", stats.get("device_hits")),
        "plora_prefetch_issued": ("Device prefetches started by the policy", stats.get("prefetch_issued")),
        "plora_compiles_after_warmup": (
            "XLA compiles on the loop thread after warm-up",
            stats.get("compiles_after_warmup"),
        ),
    }
    if "adapter_pool_bytes" in stats:
        values |= {
            "plora_adapters_pinned": ("Device adapters in use by running requests", stats.get("adapters_pinned")),
            "plora_adapter_kv_blocks": ("KV blocks adapters hold (one memory budget)", stats.get("adapter_kv_blocks")),
            "plora_kv_reclaims": ("Adapters evicted for the KV cache's blocks", stats.get("kv_reclaims")),
            "plora_adapter_pool_utilisation": (
                "Live adapter bytes at true rank / device bytes reserved for resident adapters",
                adapter_mem_util(stats.get("adapter_live_bytes", 0), stats.get("adapter_reserved_bytes", 0)),
            ),
            "plora_adapter_pool_fill": (
                "Device bytes reserved for resident adapters / adapter pool bytes",
                adapter_pool_fill(stats.get("adapter_reserved_bytes", 0), stats.get("adapter_pool_bytes", 0)),
            ),
            "plora_prefetch_precision": ("Prefetches used by a request / prefetches issued", prefetch_precision(stats)),
            "plora_prefetch_recall": (
                "Requests a finished prefetch served / those plus the cold starts",
                prefetch_recall(stats),
            ),
            **{
                f"plora_{key}": (f"{key.replace('_', ' ').capitalize()} (plora_jax.metrics.tier_prefetch)", value)
                for key, value in tier_prefetch(stats).items()
            },
            **{
                f"plora_{key}": (f"{key.replace('_', ' ').capitalize()} (plora_jax.metrics.LinkFit)", stats[key])
                for key in sorted(stats)
                if key.startswith("link_")
            },
        }
    if "node_cache_budget" in stats:  # the node tier: adapters fetched from object storage
        values |= {
            "plora_node_cache_hits": ("Remote adapters read from the node's disk cache", stats["node_cache_hits"]),
            "plora_node_cache_misses": ("Remote adapters fetched from the store", stats["node_cache_misses"]),
            "plora_node_cache_evictions": ("Node cache entries evicted for its budget", stats["node_cache_evictions"]),
            "plora_node_cache_corrupt": ("Node cache entries that failed verification", stats["node_cache_corrupt"]),
            "plora_node_cache_bytes": ("Bytes in the node cache", stats["node_cache_bytes"]),
            "plora_bytes_remote_to_disk": ("Bytes fetched from adapter stores", stats["bytes_remote_to_disk"]),
        }
    return {name: (text, float(value)) for name, (text, value) in values.items() if value is not None}


RESIDENCY = ("plora_adapters", "Registered adapters by residency tier")  # a gauge tagged by tier


def tier_counts(stats: dict) -> dict[str, int]:
    """Registered adapters per residency tier ({} for an engine without adapters)."""
    return {tier: stats[f"adapters_tier_{tier}"] for tier in RESIDENCIES if f"adapters_tier_{tier}" in stats}


IN_FLIGHT = ("plora_api_in_flight", "Choices the API admitted that have not ended (what the 429 rule counts)")


class EngineCollector:
    """Engine gauges computed at scrape time, and the API's own in-flight count."""

    def __init__(self, engine, in_flight_of=None):
        self.engine, self.in_flight_of = engine, in_flight_of

    def collect(self):
        if self.in_flight_of is not None:
            yield GaugeMetricFamily(*IN_FLIGHT, value=self.in_flight_of())
        stats = self.engine.stats()  # the engine's published snapshot: never waits for the loop
        tiers = tier_counts(stats)
        if tiers:
            residency = GaugeMetricFamily(*RESIDENCY, labels=["tier"])
            for tier, count in tiers.items():
                residency.add_metric([tier], count)
            yield residency
        for name, (help_text, value) in engine_values(stats).items():
            yield GaugeMetricFamily(name, help_text, value=value)


class ServerMetrics:
    def __init__(self, engine, in_flight_of=None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "plora_requests", "Requests by endpoint and final status", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "plora_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            "plora_generation_tokens", "Generated tokens of finished requests", registry=self.registry
        )
        self.ttft = Histogram(
            "plora_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.e2e = Histogram(
            "plora_e2e_seconds", "Request arrival to last token", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.registry.register(EngineCollector(engine, in_flight_of))

    def finished(self, endpoint: str, status: str, *outputs) -> None:
        """One HTTP request ended with `status`; `outputs`: its choices' engine outputs."""
        self.requests.labels(endpoint, status).inc()
        for output in outputs:
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.generation_tokens.inc(len(output.token_ids))
            if output.metrics is not None:
                self.ttft.observe(output.metrics.ttft_s)
                self.e2e.observe(output.metrics.e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
