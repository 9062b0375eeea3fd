"""Every adapter metric the project reports, defined once.

`Engine.stats()`, the Prometheus exporter (`serving/metrics.py`), the replay report
(`serverless/report.py`, live and simulated alike) and the benchmarks all take their counter
names and their ratios from here, so a figure means the same thing wherever it is printed.

Counters (`ADAPTER_COUNTERS`), counted as each request reaches the engine (queued, before any
decision its arrival triggers, so a load it set off is still its cold start) unless said:
- `cold_starts`: the request's adapter was not on the device (a load in flight counts as cold);
- `device_hits`: it was; `host_hits`: it was cold but its pages were in the host cache;
- `prefetch_issued`: device prefetches a policy started; `prefetch_used`: prefetched adapters
  that a request then asked for; `prefetch_hits`: of those, the ones already on the device;
  `prefetch_wasted`: prefetched adapters evicted before any request asked for them;
- `stale_dropped`: finished transfers dropped because their placement was removed meanwhile;
  `load_failures`: loads that raised; `host_prefetch_issued`, `host_evictions`: the host tier's;
- `bytes_disk_to_host`, `bytes_host_to_device`: bytes moved between tiers.

The node tier's counters (`NODE_CACHE_COUNTERS`, counted by `lora.node_cache.NodeCache` per
process, over every adapter it opened from a store): `node_cache_hits`: a remote adapter was
read from the node's disk; `node_cache_misses`: it was fetched from the store first;
`node_cache_evictions`: entries deleted to keep the cache within its budget;
`node_cache_corrupt`: entries whose size or sha256 no longer matched (fetched again);
`bytes_remote_to_disk` and `node_cache_fetch_s`: what the fetches moved and how long they took
(their ratio is the remote link's measured bytes/s); `node_cache_link_yields`: times a
background fetch's chunk waited for a demand fetch on the link.

Per request (`serverless/report.py` computes them, live and simulated alike):
- adapter wait: from the request's first admission attempt until its adapter is on the device
  (0 when it already was);
- cold-start latency, conditional: the adapter wait over a run's own cold starts
  (`cold_start_{median,mean,p99}_s`); paired: over the requests that were cold starts in the
  baseline's run (`reactive_sync`) of the same workload (`baseline_cold_{median,mean,p99}_s`),
  the paper's figure;
- `stall_s`: the seconds each synchronous load held the engine loop, times the running
  requests it held up (0 with asynchronous loads).

Ratios (each 0.0 when its denominator is 0):
- adapter memory utilisation = live adapter bytes (at true rank) / device bytes reserved for
  the resident adapters. The paged layout loses only the rounding to whole pages; the
  contiguous one loses the padding of every slot to the maximum rank. Over a run (the replay's
  figure) it is the time average: live byte-seconds / reserved byte-seconds, both integrated
  exactly at every change of the pool (`adapter_live_byte_s`, `adapter_reserved_byte_s`), so a
  short residency counts for its duration and an empty pool for nothing. (How full the pool is,
  reserved / pool bytes, is `adapter_pool_fill`, a separate figure.)
- prefetch precision = prefetch_used / prefetch_issued;
- prefetch recall = prefetch_hits / (prefetch_hits + cold_starts): of the requests that would
  have been cold without prefetching, the share a finished prefetch served;
- device hit rate = device_hits / (device_hits + cold_starts).
"""

from __future__ import annotations

from collections.abc import Mapping

ADAPTER_COUNTERS = (
    *("cold_starts", "device_hits", "host_hits", "stale_dropped", "load_failures"),
    *("prefetch_issued", "prefetch_used", "prefetch_hits", "prefetch_wasted"),
    *("host_prefetch_issued", "host_evictions"),
    *("bytes_disk_to_host", "bytes_host_to_device"),
)

NODE_CACHE_COUNTERS = ("node_cache_hits", "node_cache_misses", "node_cache_evictions", "node_cache_corrupt")


def ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def adapter_mem_util(live_bytes: float, reserved_bytes: float) -> float:
    return ratio(live_bytes, reserved_bytes)


def adapter_pool_fill(reserved_bytes: float, pool_bytes: float) -> float:
    return ratio(reserved_bytes, pool_bytes)


def prefetch_precision(counters: Mapping[str, float]) -> float:
    return ratio(counters.get("prefetch_used", 0), counters.get("prefetch_issued", 0))


def prefetch_recall(counters: Mapping[str, float]) -> float:
    hits = counters.get("prefetch_hits", 0)
    return ratio(hits, hits + counters.get("cold_starts", 0))


def device_hit_rate(counters: Mapping[str, float]) -> float:
    hits = counters.get("device_hits", 0)
    return ratio(hits, hits + counters.get("cold_starts", 0))


def adapter_ratios(stats: Mapping[str, float]) -> dict[str, float]:
    """The derived figures of a stats dict holding the counters and the byte counts
    (`adapter_live_bytes`, `adapter_reserved_bytes`, `adapter_pool_bytes`)."""
    live, reserved = stats.get("adapter_live_bytes", 0), stats.get("adapter_reserved_bytes", 0)
    return {
        "adapter_mem_util": adapter_mem_util(live, reserved),
        "adapter_pool_fill": adapter_pool_fill(reserved, stats.get("adapter_pool_bytes", 0)),
        "prefetch_precision": prefetch_precision(stats),
        "prefetch_recall": prefetch_recall(stats),
        "device_hit_rate": device_hit_rate(stats),
    }
