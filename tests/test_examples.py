"""Smoke test of the demo: it runs end to end and prints its accuracy table."""

import os
import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "digits.py"

# A table row: the BatchNorm mode, then the train and test accuracies in percent.
ROW = re.compile(r"^(train=True|train=False)\b.*?(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)%\s*$")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs the demo in a fresh interpreter, as strict as the test suite."""
    env = {**os.environ, "JAX_NUMPY_RANK_PROMOTION": "raise"}
    return subprocess.run(
        [sys.executable, "-W", "error", str(DEMO), *args],
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
