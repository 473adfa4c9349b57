"""A strict test environment.

* Eight simulated CPU devices, so synchronized statistics are tested on a
  real mesh. XLA reads this flag when the backend starts, which is after
  this file runs and before any test touches a device.
* Implicit rank promotion raises: bnjax must broadcast explicitly.
* Every warning is an error (pyproject.toml).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled, and restores the setting after."""
    with jax.enable_x64(True):
        yield
