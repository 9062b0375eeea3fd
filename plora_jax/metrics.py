"""Every adapter metric the project reports, defined once.

`Engine.stats()`, the Prometheus exporter (`serving/metrics.py`), the replay report
(`serverless/report.py`, live and simulated alike) and the benchmarks all take their counter
names and their ratios from here, so a figure means the same thing wherever it is printed.

Counters (`ADAPTER_COUNTERS`), counted as each request reaches the engine (queued, before any
decision its arrival triggers, so a load it set off is still its cold start) unless said:
- `cold_starts`: the request's adapter was not on the device (a load in flight counts as cold);
- `device_hits`: it was; a cold start is counted again by the fastest tier that held the
  adapter (`TIERS`, `TIER_COLD_COUNTER`): `host_hits` (its pages were in the host cache),
  `disk_hits` (on the node's disk: a local folder, or the node cache) or `store_misses` (only
  in its store, so fetched first);
- per tier, the prefetches into it (none prefixed: the device; `host_`: reads into the host
  cache; `disk_`: fetches from the store into the node cache): `*prefetch_issued`: started;
  `*prefetch_used`: prefetched adapters that a request then asked for; `*prefetch_hits`: of
  those, the ones the request found in that tier or a faster one (the prefetch was in time);
  `*prefetch_wasted`: prefetched adapters that left the tier before any request asked for them
  (`*prefetch_wasted_bytes`: the bytes they moved there: device, host-copy or file bytes);
- `stale_dropped`: finished transfers dropped because their placement was removed meanwhile;
  `load_failures`: loads that raised; `host_evictions`: copies the host tier dropped;
- `bytes_remote_to_disk`, `bytes_disk_to_host`, `bytes_host_to_device`: bytes moved between
  tiers (the first counted by the node cache live, which overrides the core's zero).

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

Links (`LINKS`, `LinkFit`): every physical link's measured cost, `link_{name}_latency_s` and
`link_{name}_bytes_per_s`, a line fitted through its transfers' (bytes, seconds): from the store
the node cache's fetches (file bytes), disk to host the host-only reads, host to device the
loads staged from the host cache (the time to issue the copy, plus the wait when the loop
blocked on it: a copy that landed before it was polled counts its issue only, so this line is
a bound, not the link's rate). The replay's calibration takes the store link's latency and
rate from its line; host-to-device and disk rates still come from the per-source totals
(`adapter_transfer_*`).

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
- per tier the same (`tier_prefetch`): precision = `{tier}_prefetch_used / issued`; recall =
  `{tier}_prefetch_hits` / (those + the requests that found their adapter only below the tier:
  for the host, `disk_hits + store_misses`; for the disk, `store_misses`);
- device hit rate = device_hits / (device_hits + cold_starts).
"""

from __future__ import annotations

from collections.abc import Mapping

TIERS = ("device", "host", "disk", "store")  # where an adapter can be, fastest first
RESIDENCIES = ("store", "disk", "host", "loading", "device")  # `Residency.residency`: a tier, or loading
# The counter a cold start found in each tier below the device adds to.
TIER_COLD_COUNTER = {"host": "host_hits", "disk": "disk_hits", "store": "store_misses"}
PREFETCH_TIERS = {"": "device", "host_": "host", "disk_": "disk"}  # counter prefix -> the tier it fills
TRANSFER_SOURCES = ("host", "disk", "store")  # where a device load staged from (`adapter_transfer_*_from_*`)

ADAPTER_COUNTERS = (
    *("cold_starts", "device_hits", *TIER_COLD_COUNTER.values(), "stale_dropped", "load_failures"),
    *(f"{p}prefetch_{what}" for p in PREFETCH_TIERS for what in ("issued", "used", "hits", "wasted", "wasted_bytes")),
    "host_evictions",
    "kv_reclaims",  # adapters evicted because the KV cache needed their blocks (one memory budget)
    *("bytes_remote_to_disk", "bytes_disk_to_host", "bytes_host_to_device"),
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


def tier_prefetch(counters: Mapping[str, float]) -> dict[str, float]:
    """`{tier}_prefetch_precision` and `{tier}_prefetch_recall` of the host and disk tiers."""
    out = {}
    for prefix, tier in PREFETCH_TIERS.items():
        if not prefix:
            continue  # the device's are prefetch_precision and prefetch_recall
        below = TIERS[TIERS.index(tier) + 1 :]
        missed = sum(counters.get(TIER_COLD_COUNTER[t], 0) for t in below)
        hits = counters.get(f"{prefix}prefetch_hits", 0)
        out[f"{tier}_prefetch_precision"] = ratio(
            counters.get(f"{prefix}prefetch_used", 0), counters.get(f"{prefix}prefetch_issued", 0)
        )
        out[f"{tier}_prefetch_recall"] = ratio(hits, hits + missed)
    return out


LINKS = ("remote_to_disk", "disk_to_host", "host_to_device")  # the physical links, slowest first


class LinkFit:
    """One link's measured cost: the least-squares line seconds = latency + bytes / rate through
    every transfer on it (running sums, so the state stays five numbers). With transfers of one
    size only, or a line that would need a negative latency, the latency is 0 and the rate is
    total bytes over total seconds."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = 0.0  # sums of bytes, seconds and their products

    def add(self, nbytes: float, seconds: float) -> None:
        self.n += 1
        self.sx, self.sy = self.sx + nbytes, self.sy + seconds
        self.sxx, self.sxy = self.sxx + nbytes * nbytes, self.sxy + nbytes * seconds

    def line(self) -> tuple[float, float]:
        """(latency seconds, bytes per second); (0, 0) before any transfer."""
        if self.n == 0 or self.sx <= 0 or self.sy <= 0:
            return 0.0, 0.0
        spread = self.n * self.sxx - self.sx * self.sx
        if self.n >= 2 and spread > 1e-9 * self.n * self.sxx:
            slope = (self.n * self.sxy - self.sx * self.sy) / spread
            latency = (self.sy - slope * self.sx) / self.n
            if slope > 0 and latency >= 0:
                return latency, 1.0 / slope
        return 0.0, self.sx / self.sy

    def stats(self, link: str) -> dict:
        latency, rate = self.line()
        return {f"link_{link}_transfers": self.n, f"link_{link}_latency_s": latency, f"link_{link}_bytes_per_s": rate}


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
        **tier_prefetch(stats),
    }
