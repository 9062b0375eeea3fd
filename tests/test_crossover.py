"""The crossover (`plora_jax.serverless.crossover`): with loads that cost nothing every policy's
gain over the synchronous baseline is exactly 1; with loads that cost a large share of a
step's time, the clairvoyant oracle's simulated capacity gain is within 10% of the analytic
G = 1 + C x p_c x t_sync."""

import dataclasses

import pytest

from plora_jax.config import EngineConfig
from plora_jax.serverless import crossover
from plora_jax.serverless.sim import Calibration, SimConfig
from plora_jax.serverless.workload import WorkloadConfig

# Round costs: a decode step of 16 rows 40 ms, prefill 0.1 ms a token; no commit or transfer
# cost in a step, so a load costs only what the link charges.
CAL = Calibration(
    step_base_s=0.0,
    decode_base_s=0.04,
    decode_row_s=0.0,
    prefill_base_s=0.0,
    prefill_token_s=1e-4,
    commit_page_s=0.0,
    transfer_step_s=0.0,
    request_overhead_s=0.0,
    bytes_per_rank=1000,
)
WORKLOAD = WorkloadConfig(adapters=24, minutes=4, ranks=(8, 16), token_scale=0.1, seed=1)
ENGINE = EngineConfig(max_num_seqs=16, max_loras=6, lora_pool_pages=9, page_rows=8, max_lora_rank=16)
CONFIG = SimConfig(engine=ENGINE)


def test_loads_that_cost_nothing_leave_every_gain_at_one():
    point = crossover.run_point(WORKLOAD, crossover.Link(1e30, 0.0), CAL, CONFIG, ["lru", "oracle"])
    assert point["t_sync_s"] == pytest.approx(0.0) and point["analytic_gain"] == pytest.approx(1.0)
    for policy, gain in point["gains"].items():
        assert gain["capacity_ratio"] == pytest.approx(1.0), policy
        assert gain["ttft_mean_change"] == pytest.approx(0.0, abs=1e-9), policy


def test_a_costly_load_gives_the_oracle_about_the_analytic_gain():
    link = crossover.Link(1e30, 0.25)  # 250 ms per load, whatever its size
    point = crossover.run_point(WORKLOAD, link, CAL, CONFIG, ["oracle"])
    g = point["analytic_gain"]
    assert g > 1.3  # the stall is a large share of the baseline's time
    assert point["gains"]["oracle"]["capacity_ratio"] == pytest.approx(g, rel=0.10)
    assert dataclasses.asdict(crossover.Link(1e9, 0.02)) == {"bytes_per_s": 1e9, "latency_s": 0.02}


def test_an_interval_over_seeds_matches_the_hand_computation():
    from plora_jax.serverless.uncertainty import interval

    out = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample sd sqrt(2.5), t(0.975, 4 dof) = 2.776445: half-width 1.963243
    assert out["value"] == 3.0 and out["n"] == 5
    assert out["ci95"] == pytest.approx([3.0 - 1.963243, 3.0 + 1.963243], abs=1e-6)
    assert interval([7.0]) == {"value": 7.0, "ci95": [None, None], "n": 1}


def test_goodput_bisects_to_the_largest_rate_within_the_slo():
    from plora_jax.serverless.uncertainty import goodput

    calls = []

    def p90(rate):  # a queue that holds up to 3.0 req/s, then grows
        calls.append(rate)
        return 0.2 if rate <= 3.0 else 0.2 + 10 * (rate - 3.0)

    assert goodput(p90, 1.0, 0.5, 8.0) == pytest.approx(3.08, rel=0.02)  # p90 = 1.0 at 3.08 req/s
    assert len(calls) < 12
    assert goodput(p90, 0.1, 0.5, 8.0) == 0.0 and goodput(p90, 100.0, 0.5, 8.0) == 8.0
