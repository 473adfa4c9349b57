"""Smoke tests of examples/nnx_digits.py and examples/equinox_digits.py: both norms, a table."""

import importlib
import math
import re

import equinox as eqx
import pytest
from flax import nnx

import bnjax
import bnjax.equinox
import bnjax.nnx
from tests.test_examples import EXAMPLES, run_demo

# One table row: | norm | train-mode acc | eval-mode acc | seconds |
ROW = re.compile(r"^\| (\w+) \| (\d+\.\d)% \| (\d+\.\d)% \| (\d+\.\d) \|$", re.MULTILINE)
HEADER = "| norm | train-mode acc | eval-mode acc | seconds |\n| --- | ---: | ---: | ---: |\n"


@pytest.mark.parametrize(
    ("script", "norms"),
    [("nnx_digits.py", ("flax", "bnjax")), ("equinox_digits.py", ("equinox", "bnjax"))],
)
def test_framework_example_trains_both_norms_and_prints_the_table(script, norms):
    result = run_demo("--steps", "3", "--seed", "1", script=EXAMPLES / script)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "(seed 1, 3 steps of 32, momentum 0.9" in out, out
    assert HEADER in out, out
    rows = ROW.findall(out)
    assert [row[0] for row in rows] == list(norms), out  # both norms, in the default order
    for name, train_mode, eval_mode, seconds in rows:
        for accuracy in (float(train_mode), float(eval_mode)):
            assert 0.0 <= accuracy <= 100.0, (name, out)
        assert math.isfinite(float(seconds)) and float(seconds) > 0, (name, out)


def test_one_line_switches_the_norm_and_the_default_runs_both(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    nnx_digits = importlib.import_module("nnx_digits")
    equinox_digits = importlib.import_module("equinox_digits")
    assert nnx_digits.import_norms("flax") is nnx
    assert nnx_digits.import_norms("bnjax") is bnjax.nnx
    assert equinox_digits.import_batch_norm("bnjax") is bnjax.equinox.BatchNorm
    equinox_norm = equinox_digits.import_batch_norm("equinox")
    assert (equinox_norm.func, equinox_norm.keywords) == (eqx.nn.BatchNorm, {"mode": "batch"})
    for example, norms in ((nnx_digits, ["flax", "bnjax"]), (equinox_digits, ["equinox", "bnjax"])):
        assert example.parse_args([]).norm == norms
        assert example.parse_args(["--norm", "bnjax"]).norm == ["bnjax"]
