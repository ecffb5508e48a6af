"""The benchmark scripts that need none of the shared datasets: each as a user runs it, in seconds."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_the_gpu_benchmark_runs_on_a_cpu_as_its_own_smoke_test(tmp_path):
    out = tmp_path / "gpu_throughput_cpu.json"
    args = ["--device", "cpu", "--steps", "5", "--warmup", "2", "--episodes", "1", "--max-episode-steps", "20"]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_throughput.py"), *args, "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["threads"] == 1
    assert record["training_samples_per_s"] > 0 and record["evaluation_env_steps_per_s"] > 0
    assert record["evaluation_env_steps"] == 2 * 20  # one 20-step episode at each paper target
