"""Batches with non-finite statistics leave BatchNorm's running statistics alone.

Expected running statistics come from `references.running_stats` (float64)
over the finite batches only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from tests import references
from tests.tolerances import TOL

APPLIES = {"batchnorm": bnjax.batchnorm_apply, "batchrenorm": bnjax.batchrenorm_apply}
BAD_VALUES = {"nan": np.nan, "inf": np.inf}


def _batches(rng, num, shape):
    return [(rng.normal(size=shape) * (1 + i) + i).astype(np.float32) for i in range(num)]


def _poison(x, value, rows=slice(0, 1)):
    x = x.copy()
    x[rows, ..., 0] = value
    return x


def _train(apply, state, batches, **kwargs):
    params = bnjax.batchnorm_init(state.mean.shape[0])[0]
    step = jax.jit(functools.partial(apply, train=True, **kwargs))
    states = []
    for x in batches:
        state = step(params, state, jnp.asarray(x))[1]
        states.append(state)
    return states


def _reference(batches):
    """Running statistics after the given batches, float64, momentum 0.9."""
    means = [np.asarray(x, np.float64).reshape(-1, x.shape[-1]).mean(0) for x in batches]
    variances = [np.asarray(x, np.float64).reshape(-1, x.shape[-1]).var(0) for x in batches]
    return references.running_stats(means, variances, 0.9)


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("name", APPLIES)
def test_nonfinite_batch_in_jitted_loop_leaves_running_stats_and_count(name, bad):
    rng = np.random.default_rng(0)
    batches = _batches(rng, 4, (6, 3))
    batches[1] = _poison(batches[1], BAD_VALUES[bad])
    state = bnjax.batchnorm_init(3)[1]

    states = _train(APPLIES[name], state, batches)

    after_first = states[0]
    for field in ("mean", "var", "count"):
        np.testing.assert_array_equal(getattr(states[1], field), getattr(after_first, field))


@pytest.mark.parametrize("name", APPLIES)
def test_finite_batches_after_a_nonfinite_one_update_as_if_it_never_came(name):
    rng = np.random.default_rng(1)
    batches = _batches(rng, 4, (6, 3))
    finite = [batches[0], batches[2], batches[3]]
    batches[1] = _poison(batches[1], np.nan)
    state = bnjax.batchnorm_init(3)[1]

    final = _train(APPLIES[name], state, batches)[-1]

    mean, var = _reference(finite)
    np.testing.assert_allclose(final.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(final.var, var, **TOL["float32"])
    assert int(final.count) == 3


def test_skipped_batch_still_gets_its_output():
    """Only the running update is skipped: the output is the batch's own (NaN where due)."""
    rng = np.random.default_rng(2)
    params, state = bnjax.batchnorm_init(3)
    x = _poison(_batches(rng, 1, (6, 3))[0], np.nan)

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True)

    expected = references.batchnorm(x, None, None)[0]
    np.testing.assert_allclose(y, expected, **TOL["float32"])  # NaN in channel 0 on both sides


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_option_off_lets_nonfinite_statistics_through(bad):
    rng = np.random.default_rng(3)
    batches = _batches(rng, 3, (6, 3))
    batches[1] = _poison(batches[1], BAD_VALUES[bad])
    state = bnjax.batchnorm_init(3)[1]

    states = _train(bnjax.batchnorm_apply, state, batches, skip_nonfinite=False)

    assert not np.isfinite(np.asarray(states[1].mean[0])) or not np.isfinite(states[1].var[0])
    assert not np.isfinite(np.asarray(states[2].var[0]))  # and it stays
    assert int(states[2].count) == 3


def test_factory_binds_the_option():
    rng = np.random.default_rng(4)
    x = jnp.asarray(_poison(_batches(rng, 1, (6, 3))[0], np.nan))
    for skip, expected_count in [(True, 0), (False, 1)]:
        norm = bnjax.batchnorm(skip_nonfinite=skip)
        params, state = norm.init(x.shape)
        _, new_state = norm.apply(params, state, x, True)
        assert int(new_state.count) == expected_count


def test_nonfinite_group_of_a_ghost_batch_skips_the_whole_update():
    rng = np.random.default_rng(5)
    x = _poison(_batches(rng, 1, (8, 3))[0], np.nan, rows=slice(5, 6))  # in the second group
    params, state = bnjax.batchnorm_init(3)

    _, new_state = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, virtual_batch_size=4)

    for field in ("mean", "var", "count"):
        np.testing.assert_array_equal(getattr(new_state, field), getattr(state, field))


def test_nonfinite_entry_on_one_device_makes_every_device_skip():
    rng = np.random.default_rng(6)
    num_devices = jax.device_count()
    x = _poison(_batches(rng, 1, (2 * num_devices, 3))[0], np.nan, rows=slice(3, 4))
    mesh = jax.make_mesh((num_devices,), ("data",))
    params, state = bnjax.batchnorm_init(3)

    def per_device(params, state, x):
        _, new_state = bnjax.batchnorm_apply(params, state, x, True, axis_name="data")
        return jax.tree.map(lambda a: a[None], new_state)  # one state per device

    fn = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P("data"))
    )
    per_device_states = fn(params, state, jax.device_put(x, NamedSharding(mesh, P("data"))))

    for field in ("mean", "var", "count"):
        old = np.broadcast_to(getattr(state, field), getattr(per_device_states, field).shape)
        np.testing.assert_array_equal(getattr(per_device_states, field), old)
