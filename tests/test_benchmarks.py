"""The benchmarks' CPU-safe parts: the GPU device-check script at tiny shapes (what it runs on an
accelerator, in seconds here), and the model runner's timing helpers they rely on."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
