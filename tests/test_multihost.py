"""Synchronized BatchNorm across two processes (multi-host data parallelism).

Two worker processes (`multihost_worker.py`) join one JAX runtime over
127.0.0.1 with `jax.distributed.initialize`, four CPU devices each, and their
collectives go through gloo. Each contributes half of one global batch and
runs one synchronized training step under `shard_map` over all 8 devices.
Both must see what one process sees on the whole batch: the float64 numpy
reference for the output and the running statistics, and an unsynchronized
bnjax call on the whole batch for the gradients and the SGD update.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import multihost_worker as worker
from tests import references
from tests.tolerances import SYNC_GRAD_TOL, SYNC_TOL

WORKER = Path(__file__).with_name("multihost_worker.py")
# Both workers start, compile and finish in a few seconds; this bounds a hang.
TIMEOUT_S = 120
# The loss sums 768 products of order 1: float32 rounding of each term adds
# up to ~1e-4 in absolute terms.
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-3}
# What every process must report identically (replicated results).
SHARED_KEYS = [
    "y",
    "mean",
    "var",
    "count",
    "grad_scale",
    "grad_bias",
    "new_scale",
    "new_bias",
    "loss",
    "num_devices",
]


def _free_port():
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env():
    """The environment of a worker: 4 CPU devices, whatever pytest's process has."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _logs(paths):
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')}" for p in paths)


def _run_workers(out_dir):
    """Runs both workers to completion; fails with their output if either
    fails or they take longer than TIMEOUT_S. Never leaves one running."""
    port = _free_port()
    env = _worker_env()
    log_paths = [out_dir / f"worker_{i}.log" for i in range(worker.NUM_PROCESSES)]
    procs = []
    try:
        for i, log_path in enumerate(log_paths):
            with open(log_path, "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(port), str(i), str(out_dir)],
                        env=env,
                        cwd=out_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            if all(code is not None for code in codes):
                break
            # One failure is enough: its peer might otherwise wait for it.
            if any(code not in (None, 0) for code in codes):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"workers still running after {TIMEOUT_S} s, killed\n{_logs(log_paths)}"
                )
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        note = "negative: killed by that signal; -9 is this test's, once a peer failed"
        pytest.fail(f"workers exited with {codes} ({note})\n{_logs(log_paths)}")
    return [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(len(procs))]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """What each of the two processes wrote, in process order."""
    return _run_workers(tmp_path_factory.mktemp("multihost"))


def _expected_gradients(x, dy):
    """Gradients w.r.t. the params of sum(y * dy), from one unsynchronized
    bnjax call on the whole batch in this process."""
    params = bnjax.NormParams(jnp.asarray(worker.SCALE), jnp.asarray(worker.BIAS))
    state = bnjax.BatchStats(
        mean=jnp.asarray(worker.RUNNING_MEAN),
        var=jnp.asarray(worker.RUNNING_VAR),
        count=jnp.asarray(worker.RUNNING_COUNT, jnp.int32),
    )

    def loss(params):
        y, _ = bnjax.batchnorm_apply(params, state, x, True, momentum=worker.MOMENTUM)
        return jnp.sum(y * dy)

    return jax.tree.map(np.asarray, jax.grad(loss)(params))


def test_each_process_sees_eight_devices_and_its_index(results):
    for i, result in enumerate(results):
        assert int(result["process_index"]) == i
        assert int(result["num_devices"]) == worker.NUM_PROCESSES * worker.DEVICES_PER_PROCESS
        assert int(result["num_local_devices"]) == worker.DEVICES_PER_PROCESS


def test_processes_agree_exactly(results):
    """Replicated results are the same bits in every process."""
    first, *others = results
    for other in others:
        for key in SHARED_KEYS:
            np.testing.assert_array_equal(other[key], first[key], err_msg=key)


def test_output_and_running_statistics_are_those_of_the_whole_batch(results):
    x, dy = worker.make_batch()
    expected_y, mean, var = references.batchnorm(x, worker.SCALE, worker.BIAS)
    momentum = worker.MOMENTUM
    expected_mean = momentum * np.asarray(worker.RUNNING_MEAN) + (1 - momentum) * mean
    expected_var = momentum * np.asarray(worker.RUNNING_VAR) + (1 - momentum) * var
    half = x.shape[0] // worker.NUM_PROCESSES

    for i, result in enumerate(results):
        np.testing.assert_allclose(result["y"], expected_y, **SYNC_TOL)
        # Each process's own devices hold its own half of the batch.
        mine = slice(i * half, (i + 1) * half)
        np.testing.assert_allclose(result["y_local"], expected_y[mine], **SYNC_TOL)
        np.testing.assert_allclose(result["mean"], expected_mean, **SYNC_TOL)
        np.testing.assert_allclose(result["var"], expected_var, **SYNC_TOL)
        assert int(result["count"]) == worker.RUNNING_COUNT + 1
        np.testing.assert_allclose(result["loss"], np.sum(expected_y * dy), **LOSS_TOL)


def test_gradients_and_sgd_update_are_those_of_the_whole_batch(results):
    x, dy = worker.make_batch()
    grads = _expected_gradients(x, dy)
    new_scale = np.asarray(worker.SCALE) - worker.LEARNING_RATE * grads.scale
    new_bias = np.asarray(worker.BIAS) - worker.LEARNING_RATE * grads.bias

    for result in results:
        np.testing.assert_allclose(result["grad_scale"], grads.scale, **SYNC_GRAD_TOL)
        np.testing.assert_allclose(result["grad_bias"], grads.bias, **SYNC_GRAD_TOL)
        np.testing.assert_allclose(result["new_scale"], new_scale, **SYNC_GRAD_TOL)
        np.testing.assert_allclose(result["new_bias"], new_bias, **SYNC_GRAD_TOL)
