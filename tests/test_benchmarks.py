"""The benchmarks' CPU-safe parts: the GPU device-check script at tiny shapes (what it runs on an
accelerator, in seconds here), the model runner's timing helpers they rely on, and a short soak
of the live server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmarks run end to end (a live server, the GPU script at tiny shapes)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_its_steps_at_tiny_shapes_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu-check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert payload["preset"] == "tiny" and payload["rows"][0]["ours_tok_s"] > 0
    assert payload["decode_step"]["step_s"] > 0 and payload["decode_step"]["matmuls_s"] > 0
    assert "passed" in (tmp_path / "gpu_tests.log").read_text()
    profile = json.loads((tmp_path / "gpu_profile.json").read_text())["calibration"]
    from plora_jax.engine.step_log import StepShape
    from plora_jax.serverless.sim import Calibration

    one_row = StepShape(1, 1, 0, 0, 0, False)
    assert profile["fit_steps"] > 10 and Calibration(**profile).step_s(one_row) > 0
    assert profile["h2d_bytes_per_s"] > 0 and profile["bytes_per_rank"] > 0
    load = json.loads((tmp_path / "load_path.json").read_text())["rows"]
    assert [r["rank"] for r in load] == [8] and load[0]["engine_bytes_per_s"] > 0


def test_the_soak_runs_a_live_server_and_counts_every_stream(tmp_path):
    """A short soak: every stream is counted one way, nothing is lost, no 5xx, the swaps
    succeed, and nothing is left held once the server is idle."""
    from benchmarks import soak

    out = tmp_path / "soak.json"
    argv = ["--minutes", "0.2", "--clients", "4", "--swap-every-s", "3", "--max-num-seqs", "4"]
    result = soak.main([*argv, "--max-model-len", "256", "--max-tokens", "8", "--json", str(out)])
    assert json.loads(out.read_text())["requests"] == result["requests"] > 0
    counts = result["counts"]
    assert counts.get("lost", 0) == 0 and counts.get("5xx", 0) == 0 and counts["completed"] > 0
    assert counts["swaps"] >= 2 and counts.get("swap_failures", 0) == 0
    assert result["left_when_idle"] == {"kv_blocks_used": 0, "adapters_pinned": 0, "running_requests": 0}
    assert result["server_exit_code"] == 0
