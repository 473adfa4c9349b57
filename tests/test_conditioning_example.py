"""Smoke test of examples/conditioning.py: a few steps end to end, a PNG and finite errors."""

import json
import math
import re

from tests.test_examples import EXAMPLES, PNG_SIGNATURE, run_demo

SCRIPT = EXAMPLES / "conditioning.py"
MODELS = ("unconditioned", "conditioned")


def test_conditioning_example_writes_png_json_and_table(tmp_path):
    result = run_demo("--steps", "3", "--seed", "1", "--out", str(tmp_path), script=SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    # adaLN-Zero: the zero-initialized modulation leaves the conditioned model
    # exactly where its unconditioned twin starts.
    assert "at initialization the two models agree on every test example: True" in out, out

    assert (tmp_path / "denoised.png").read_bytes().startswith(PNG_SIGNATURE)

    report = json.loads((tmp_path / "results.json").read_text())
    assert (report["seed"], report["steps"]) == (1, 3)
    rows = report["errors"]
    assert len(rows) >= 2
    overall = rows[-1]
    assert (overall["sigma_min"], overall["sigma_max"]) == tuple(report["sigma_range"])
    assert overall["examples"] == report["test_examples"]
    assert sum(row["examples"] for row in rows[:-1]) == report["test_examples"]
    for row in rows:
        for name in (*MODELS, "noisy"):
            assert math.isfinite(row[name]) and row[name] >= 0, (name, row)
    for name in MODELS:
        assert all(math.isfinite(loss) for loss in report["train_loss_every_50_steps"][name])

    # The printed table has one row per bucket plus the overall one.
    table = re.findall(r"^\| (all|[\d.]+-[\d.]+) \| (\d+) \|", out, re.MULTILINE)
    assert len(table) == len(rows), out
    assert table[-1] == ("all", str(report["test_examples"])), out
