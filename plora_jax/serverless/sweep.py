"""Operating points of a replay: the device pool as a share of the adapters' bytes, and the
arrival rate as a multiple of what the engine can serve.

The paper's claims depend on where they are measured. With a pool that holds a few percent of
the adapters no forecast can help; with one that holds them all nothing is ever cold. Offered
far beyond capacity, every policy's TTFT is the queue's; far below, nothing but loads matters.
So `benchmarks.replay` runs every policy at every point of a grid:

- pool budget F: the device pool gets F x the pages all the workload's adapters take (paged
  layout, `adapter_pages`), plus the reserved page. The contiguous layout gets the same pages,
  and so the same bytes: what it holds less is its fragmentation. Slots are never the limit:
  the pool gets as many as the smallest adapters that fit in its pages (`pool_for_budget`).
- load X: the arrival rate is set to X times one instance's capacity (`capacity_rps`, from a
  cost profile) by stretching or compressing trace time (`seconds_per_minute`), never by
  changing how many requests arrive in a trace minute. "High concurrency" is X in 0.9-1.2.

Capacity is the cost profile's, at full batch: a request costs its prompt's prefill tokens and
one decode row per output token, in a decode step of `max_num_seqs` rows that each run an
adapter, at the measured requests' mean lengths. Loads, cold starts and the queue are left out; they
are what the policies differ in.
"""

from __future__ import annotations

import dataclasses
import math

from ..buckets import cdiv, pick_bucket
from ..engine.compile_plan import Buckets
from ..engine.step_log import StepShape
from .workload import Workload, WorkloadConfig, generate


def adapter_pages(ranks, page_rows: int) -> int:
    """Pages all the adapters take in the paged layout."""
    return sum(cdiv(r, page_rows) for r in ranks)


def pool_for_budget(ranks, budget: float, page_rows: int) -> tuple[int, int]:
    """(lora_pool_pages, max_loras) for a pool of `budget` x the adapters' pages: the page count
    with the reserved page 0, and slots for as many of the smallest adapters as fit."""
    if not budget > 0:
        raise ValueError(f"pool budget must be > 0, got {budget}")
    usable = max(1, round(budget * adapter_pages(ranks, page_rows)))
    return usable + 1, slots_for_pages(ranks, usable, page_rows)


def slots_for_pages(ranks, usable_pages: int, page_rows: int) -> int:
    """How many adapters, the smallest first, fit in `usable_pages` at once (at least 1)."""
    fitting, used = 0, 0
    for pages in sorted(cdiv(r, page_rows) for r in ranks):
        if used + pages > usable_pages:
            break
        used, fitting = used + pages, fitting + 1
    return max(1, fitting)


def capacity_rps(calibration, workload: Workload, engine_config) -> float:
    """Requests per second one instance serves at full batch (module docstring), at the mean
    lengths of the measured requests (a warm-up's are left out)."""
    requests = workload.measured_requests
    if not requests:
        raise ValueError("capacity_rps: the workload has no measured requests")
    prompt = sum(r.prompt_tokens for r in requests) / len(requests)
    output = sum(r.output_tokens for r in requests) / len(requests)
    prompt = min(prompt, engine_config.max_model_len - 2)
    rows = engine_config.max_num_seqs
    buckets = Buckets.build(engine_config, engine_config.max_model_len, 0)
    context = rows * (prompt + output / 2)
    step = StepShape(pick_bucket(rows, buckets.decode), int(context), 0, rows, 0, False)
    decode_token_s = calibration.step_s(step) / rows  # one output token of one row
    chunk = buckets.prefill[-1]
    prefill_s = (
        prompt * (calibration.prefill_token_s + calibration.prefill_adapter_token_s)
        + math.ceil(prompt / chunk) * calibration.prefill_base_s
    )
    return 1.0 / (output * decode_token_s + prefill_s)


def scale_to_load(config: WorkloadConfig, workload: Workload, load: float, capacity: float, instances: int = 1):
    """`config` with `seconds_per_minute` set so the offered rate is `load` x `instances` x
    `capacity`, and its workload (the same requests, arrival times scaled)."""
    if not load > 0:
        raise ValueError(f"load must be > 0, got {load}")
    # the measured minutes' rate: a warm-up's minutes may be busier or quieter
    measured = len(workload.measured_requests)
    if not measured:
        raise ValueError("scale_to_load: the workload has no requests in its measured minutes")
    offered = measured / (workload.duration_s - workload.measured_from_s)
    factor = offered / (load * capacity * instances)
    scaled = dataclasses.replace(config, seconds_per_minute=config.seconds_per_minute * factor)
    return scaled, generate(scaled)
