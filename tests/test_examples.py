"""Smoke tests of the examples and benchmarks: they run end to end and report."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO = EXAMPLES / "digits.py"

# A table row: the BatchNorm mode, then the train and test accuracies in percent.
ROW = re.compile(r"^(train=True|train=False)\b.*?(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)%\s*$")


def run_demo(*args: str, script: Path = DEMO) -> subprocess.CompletedProcess[str]:
    """Runs an example in a fresh interpreter, as strict as the test suite."""
    env = {**os.environ, "JAX_NUMPY_RANK_PROMOTION": "raise"}
    return subprocess.run(
        [sys.executable, "-W", "error", str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_digits_demo_runs_and_reports_four_accuracies():
    result = run_demo("--epochs", "1", "--batch-size", "128", "--seed", "1")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows[match[1]] = (float(match[2]), float(match[3]))
    assert set(rows) == {"train=True", "train=False"}, result.stdout
    for mode, accuracies in rows.items():
        for accuracy in accuracies:
            assert 0.0 <= accuracy <= 100.0, (mode, result.stdout)
    assert re.search(r"^Total runtime: \d+(\.\d+)? s$", result.stdout, re.MULTILINE), result.stdout


def test_normalizers_example_prints_one_line_per_normalizer():
    result = run_demo("--epochs", "1", script=EXAMPLES / "normalizers.py")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(\w[\w ,]*?)\s+(\d+\.\d+)\s+(\d+\.\d+)%\s+\d+\.\d+$", result.stdout, re.M)
    names = [name for name, _, _ in rows]
    assert names == [
        "batchnorm",
        "batchnorm, ghost 16",
        "batchrenorm",
        "groupnorm, 8 groups",
        "instancenorm",
        "layernorm",
        "rmsnorm",
    ], result.stdout
    for _, loss, accuracy in rows:
        assert float(loss) >= 0 and 0 <= float(accuracy) <= 100, result.stdout


def test_data_parallel_example_keeps_running_stats_identical_on_every_device():
    result = run_demo("--devices", "4", "--steps", "3", script=EXAMPLES / "data_parallel.py")
    assert result.returncode == 0, result.stderr
    assert "4 devices, global batch 64" in result.stdout, result.stdout
    assert "running mean identical on all 4 devices: True" in result.stdout, result.stdout


def test_data_parallel_example_runs_as_two_processes():
    result = run_demo(
        "--processes", "2", "--devices", "2", "--steps", "2", script=EXAMPLES / "data_parallel.py"
    )
    assert result.returncode == 0, result.stderr
    assert "2 processes, 4 devices, global batch 64" in result.stdout, result.stdout
    assert "running mean identical on all 4 devices: True" in result.stdout, result.stdout


def test_sync_overhead_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "sync.json"
    script = EXAMPLES.parent / "benchmarks" / "sync_overhead.py"
    result = run_demo("--devices", "2", "--repeats", "1", "--out", str(out), script=script)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["statistics"] for r in rows} == {"per-device", "synchronized"}
    assert all(r["median_ms"] > 0 for r in rows)
