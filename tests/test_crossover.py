"""The crossover (`plora_jax.serverless.crossover`): with loads that cost nothing every policy's
gain over the synchronous baseline is exactly 1; with loads that cost several decode steps,
the simulated gain is within 10% of the analytic G = 1 + C x p_c x t_sync (p_c: the baseline's
synchronous waits per request). And the figures
that carry their uncertainty: an interval over seeds, goodput by bisection."""

import json

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
WORKLOAD = WorkloadConfig(adapters=24, minutes=10, ranks=(8, 16), token_scale=0.1, seed=1)
ENGINE = EngineConfig(max_num_seqs=16, max_loras=6, lora_pool_pages=9, page_rows=8, max_lora_rank=16)
CONFIG = SimConfig(engine=ENGINE)


def test_loads_that_cost_nothing_leave_every_gain_at_one():
    point = crossover.run_point(WORKLOAD, crossover.Link(1e30, 0.0), CAL, CONFIG, ["lru", "oracle"])
    assert point["t_sync_s"] == pytest.approx(0.0) and point["analytic_gain"] == pytest.approx(1.0)
    for policy, gain in point["gains"].items():
        assert gain["capacity_ratio"] == pytest.approx(1.0), policy
        assert gain["ttft_mean_change"] == pytest.approx(0.0, abs=1e-9), policy


def test_a_costly_load_costs_the_baseline_what_the_analytic_gain_says():
    """200 ms per load: the baseline's capacity (served per busy second, offered 1.5 x C) falls
    to C / G, G = 1 + C x (its synchronous waits per request) x t_sync, within 10%; the oracle,
    which hides its loads, gains about G (it also caches, so a little more is possible)."""
    point = crossover.run_point(WORKLOAD, crossover.Link(1e30, 0.2), CAL, CONFIG, ["oracle"])
    g = point["analytic_gain"]
    assert g > 1.15 and point["t_sync_s"] == pytest.approx(0.2)
    assert point["bound_gain"] == pytest.approx(g, rel=0.10)
    assert point["gains"]["oracle"]["capacity_ratio"] == pytest.approx(g, rel=0.10)
    assert point["gains"]["oracle"]["ttft_mean_change"] < -0.2


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


def test_the_crossover_benchmark_writes_every_point_and_its_plot(tmp_path, capsys):
    from benchmarks import crossover as bench

    out = tmp_path / "c.json"
    argv = [
        "--bandwidths-gb-s",
        "1",
        "--latencies-ms",
        "1,100",
        "--rank-mixes",
        "8-16",
        "--policies",
        "lru",
        "--seeds",
        "2",
    ]
    argv += ["--adapters", "8", "--minutes", "3", "--json", str(out), "--plot", str(tmp_path / "c.png")]
    assert bench.main(argv) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["link"]["latency_s"] for p in points] == [0.001, 0.1]
    assert all(p["ranks"] == [8, 16] and set(p["gains"]) == {"reactive_sync", "lru"} for p in points)
    lo, hi = points[1]["ci95"]["lru.capacity_ratio"]  # two seeds: an interval around their mean
    assert points[1]["seeds"] == 2 and lo <= points[1]["gains"]["lru"]["capacity_ratio"] <= hi
    assert (tmp_path / "c.png").stat().st_size > 0 and "| GB/s |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:  # its help prints (a "%" in a field comment once broke it)
        bench.main(["--help"])
    assert done.value.code == 0 and "95% intervals" in capsys.readouterr().out
