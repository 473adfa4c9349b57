"""Synchronized BatchNorm: `batchnorm_apply(..., axis_name=...)`.

With `axis_name`, training statistics are those of the whole batch across the
mapped axis (`vmap(..., axis_name=...)`, `shard_map` or `pmap`), pooled
exactly by count, in at most two collectives per call whose total size does
not grow with the number of devices. Expected values come from float64 numpy
(`references.batchnorm`), or, for the "synchronized equals one call on the
whole batch" equivalences, from an unsynchronized bnjax call on the
concatenated batch on one device. Collectives are counted and sized in the
traced jaxpr.

The mesh tests run on the 8 CPU devices that `conftest.py` asks XLA for.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from tests import helpers, references
from tests.helpers import random_input, random_mask, random_params
from tests.tolerances import LARGE_MEAN_TOL, SYNC_GRAD_TOL, SYNC_TOL

# Synchronized vs one unsynchronized float32 bnjax call on the same data: the
# same formulas, only the order of the float32 additions differs (a pooled sum
# of 8 partial sums instead of one sum), a few ulps of values of order 1-10.
SAME_MATH_TOL = {"rtol": 1e-5, "atol": 1e-5}

NUM_DEVICES = 8
C = 3
MOMENTUM = 0.9

# (whole-batch shape, feature axis). The batch axis (0) is the mapped one.
LAYOUTS = [((16, C), -1), ((16, 4, 4, C), -1), ((16, C, 4, 4), 1)]
LAYOUT_IDS = ["NC", "NHWC", "NCHW"]
MAPPINGS = ["vmap", "shard_map"]

# Names of the primitives that move data between devices.
COLLECTIVES = (
    "all_gather",
    "all_reduce",
    "all_to_all",
    "pmax",
    "pmin",
    "ppermute",
    "psum",
    "reduce_scatter",
)


@pytest.fixture
def mesh():
    """A 1-D mesh of all 8 CPU devices, current for the test's duration."""
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
    with jax.set_mesh(mesh):
        yield mesh


def _params():
    """Non-trivial affine parameters, one value per feature."""
    return random_params(np.random.default_rng(100), (C,))


def _state():
    """Running statistics away from their initial values, so the update shows."""
    return bnjax.BatchStats(
        mean=jnp.asarray([0.5, -0.25, 1.0], jnp.float32),
        var=jnp.asarray([2.0, 0.5, 1.5], jnp.float32),
        count=jnp.asarray(3, jnp.int32),
    )


def _input(shape, axis, seed=0):
    """float32 values of order 1-10 whose mean differs by device block and feature.

    Each of the 8 contiguous blocks of the batch axis (one device's shard) is
    offset by a different amount, so per-device statistics differ clearly from
    the whole batch's.
    """
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.5, 2.0, size=_feature_shape(shape, axis))
    offsets = np.repeat(np.linspace(-7.0, 7.0, NUM_DEVICES), shape[0] // NUM_DEVICES)
    x = random_input(rng, shape, np.float64) * spread
    return (x + offsets.reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)


def _feature_shape(shape, axis):
    """Shape of size 1 except the feature axis: per-feature arrays broadcast."""
    out = [1] * len(shape)
    out[axis] = shape[axis]
    return tuple(out)


def _expected_state(state, mean, var, count=1):
    """The running update after one training call, in float64."""
    old_mean = np.asarray(state.mean, np.float64)
    old_var = np.asarray(state.var, np.float64)
    return (
        MOMENTUM * old_mean + (1 - MOMENTUM) * mean,
        MOMENTUM * old_var + (1 - MOMENTUM) * var,
        int(state.count) + count,
    )


def _vmap_apply(*, axis=-1, axis_name="batch", train=True):
    """Jitted batchnorm_apply on one example per vmapped instance (vmap axis 'batch').

    `axis` is the feature axis of the whole batch; each instance sees the
    example without the batch axis. New states come back stacked, one per
    instance.
    """
    per_example_axis = axis - 1 if axis > 0 else axis

    def per_example(params, state, x):
        return bnjax.batchnorm_apply(
            params, state, x, train, axis=per_example_axis, axis_name=axis_name
        )

    return jax.jit(jax.vmap(per_example, in_axes=(None, None, 0), axis_name="batch"))


def _shard_apply(mesh, *, axis_name="data", train=True, masked=False, check_vma=True, **kwargs):
    """batchnorm_apply under a jitted shard_map over 'data'.

    The batch (and the mask, when `masked`) are split on their first axis,
    params and state are replicated. Every device returns its new state with
    a leading axis of 1, so the result stacks one state per device and the
    test can see that they agree.
    """

    def per_device(params, state, x, *mask):
        y, new_state = bnjax.batchnorm_apply(
            params, state, x, train, axis_name=axis_name, mask=mask[0] if mask else None, **kwargs
        )
        return y, jax.tree.map(lambda a: a[None], new_state)

    in_specs = (P(), P(), P("data")) + ((P("data"),) if masked else ())
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(P("data"), P("data")),
        check_vma=check_vma,
    )
    return jax.jit(fn)


def _split(mesh, a):
    """Places `a` on the mesh with its first axis split over 'data'."""
    return jax.device_put(a, NamedSharding(mesh, P("data")))


def _mapped(mapping, mesh, *, axis):
    """(apply, place): the synchronized call under `mapping`, and how to lay out
    a batch-shaped array for it."""
    if mapping == "vmap":
        return _vmap_apply(axis=axis), jnp.asarray
    return _shard_apply(mesh, axis=axis), lambda a: _split(mesh, a)


def _host(tree):
    """`tree` with every array as a numpy array: sharded arrays index freely."""
    return jax.tree.map(np.asarray, tree)


def _assert_replicated(stacked_state, num_instances):
    """Every mapped instance holds the same new state."""
    for leaf in _host(stacked_state):
        assert leaf.shape[0] == num_instances
        for copy in leaf[1:]:
            np.testing.assert_array_equal(copy, leaf[0])


def _assert_state_close(stacked_state, expected, tol):
    """Every instance's (mean, var, count) equals the float64 expectation."""
    mean, var, count = expected
    stacked_state = _host(stacked_state)
    for i in range(stacked_state.count.shape[0]):
        np.testing.assert_allclose(stacked_state.mean[i], mean, **tol)
        np.testing.assert_allclose(stacked_state.var[i], var, **tol)
        assert int(stacked_state.count[i]) == count


def _collectives(jaxpr):
    """The cross-device collective equations of `jaxpr`, recursively through sub-jaxprs."""
    return [
        eqn
        for eqn in helpers.equations(jaxpr)
        if any(name in eqn.primitive.name for name in COLLECTIVES)
    ]


def _payload(eqns):
    """How many values the collectives `eqns` move: the sizes of their operands."""
    return sum(math.prod(v.aval.shape) for eqn in eqns for v in eqn.invars)


def _full_rank(mask, ndim):
    """A lower-rank mask at `x`'s rank: aligned with the leading axes (SPEC's
    mask rule), so a float64 reference broadcasts it by numpy's rules."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


# --- synchronized == one call on the whole batch -------------------------------


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_synchronized_output_equals_whole_batch(mesh, mapping, shape, axis):
    x = _input(shape, axis)
    params, state = _params(), _state()
    apply, place = _mapped(mapping, mesh, axis=axis)

    y, _ = apply(params, state, place(x))

    whole, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis)
    np.testing.assert_allclose(np.asarray(y), whole, **SAME_MATH_TOL)
    expected, _, _ = references.batchnorm(x, params.scale, params.bias, axis=axis)
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_synchronized_running_statistics_are_the_whole_batch_ones(mesh, mapping, shape, axis):
    x = _input(shape, axis)
    params, state = _params(), _state()
    apply, place = _mapped(mapping, mesh, axis=axis)

    _, new_states = apply(params, state, place(x))
    new_states = _host(new_states)

    num_instances = shape[0] if mapping == "vmap" else NUM_DEVICES
    _assert_replicated(new_states, num_instances)
    _, whole = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis)
    np.testing.assert_allclose(new_states.mean[0], whole.mean, **SAME_MATH_TOL)
    np.testing.assert_allclose(new_states.var[0], whole.var, **SAME_MATH_TOL)
    _, mean, var = references.batchnorm(x, params.scale, params.bias, axis=axis)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_synchronized_gradients_equal_whole_batch(mesh, mapping, shape, axis):
    """Gradients of a scalar loss of the mapped function w.r.t. the shared
    params (summed over instances by autodiff) and the input."""
    x = _input(shape, axis)
    dy = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    params, state = _params(), _state()
    apply, place = _mapped(mapping, mesh, axis=axis)
    x_mapped, dy_mapped = place(x), place(dy)

    def mapped_loss(params, x):
        return jnp.sum(apply(params, state, x)[0] * dy_mapped)

    def whole_loss(params, x):
        return jnp.sum(bnjax.batchnorm_apply(params, state, x, True, axis=axis)[0] * dy)

    grads = jax.grad(mapped_loss, argnums=(0, 1))(params, x_mapped)
    expected = jax.grad(whole_loss, argnums=(0, 1))(params, jnp.asarray(x))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, **SYNC_GRAD_TOL)


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "explicit_psum"])
def test_gradients_taken_inside_shard_map_equal_whole_batch(mesh, check_vma):
    """Each device differentiates its share of the loss. With check_vma, JAX
    sums the replicated params' gradients itself; without, the user psums
    them. The input's gradient needs no user collective either way: the
    cross-device terms flow back through batchnorm's own collective."""
    shape, axis = (16, 4, 4, C), -1
    x = _input(shape, axis)
    dy = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    params, state = _params(), _state()

    def per_device(params, state, x, dy):
        def loss(params, x):
            y, _ = bnjax.batchnorm_apply(params, state, x, True, axis_name="data")
            return jnp.sum(y * dy)

        param_grads, x_grad = jax.grad(loss, argnums=(0, 1))(params, x)
        if not check_vma:
            param_grads = lax.psum(param_grads, "data")
        return param_grads, x_grad

    grads_fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P("data")),
        check_vma=check_vma,
    )
    grads = jax.jit(grads_fn)(params, state, _split(mesh, x), _split(mesh, dy))

    def whole_loss(params, x):
        return jnp.sum(bnjax.batchnorm_apply(params, state, x, True)[0] * dy)

    expected = jax.grad(whole_loss, argnums=(0, 1))(params, jnp.asarray(x))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, **SYNC_GRAD_TOL)


def test_synchronized_state_is_replicated_for_shard_map_out_specs(mesh):
    """The new running statistics are the same on every device, so shard_map,
    with its default checks, accepts them as a replicated output (P())."""
    x = _input((16, C), -1)
    params, state = _params(), _state()

    def per_device(params, state, x):
        return bnjax.batchnorm_apply(params, state, x, True, axis_name="data")

    fn = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())
    )
    _, new_state = jax.jit(fn)(params, state, _split(mesh, x))

    _, mean, var = references.batchnorm(x, params.scale, params.bias)
    expected_mean, expected_var, expected_count = _expected_state(state, mean, var)
    np.testing.assert_allclose(new_state.mean, expected_mean, **SYNC_TOL)
    np.testing.assert_allclose(new_state.var, expected_var, **SYNC_TOL)
    assert int(new_state.count) == expected_count


def test_tuple_axis_name_pools_over_every_named_mesh_axis():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x = _input((16, C), -1)
    params, state = _params(), _state()

    def per_device(params, state, x):
        y, new_state = bnjax.batchnorm_apply(params, state, x, True, axis_name=("data", "model"))
        return y, jax.tree.map(lambda a: a[None], new_state)

    batch = P(("data", "model"))
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), batch), out_specs=(batch, batch))
    with jax.set_mesh(mesh):
        y, new_states = jax.jit(fn)(params, state, jax.device_put(x, NamedSharding(mesh, batch)))

    expected, mean, var = references.batchnorm(x, params.scale, params.bias)
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    _assert_replicated(new_states, NUM_DEVICES)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)


def test_two_dimensional_mesh_syncs_over_the_data_axis_only():
    """Batch split over 'data' (4 ways), replicated over 'model' (2 ways):
    syncing over 'data' alone gives the whole batch's statistics."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x = _input((16, C), -1)
    params, state = _params(), _state()

    def per_device(params, state, x):
        y, new_state = bnjax.batchnorm_apply(params, state, x, True, axis_name="data")
        return y, new_state

    fn = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())
    )
    with jax.set_mesh(mesh):
        y, new_state = jax.jit(fn)(params, state, jax.device_put(x, NamedSharding(mesh, P("data"))))

    expected, mean, var = references.batchnorm(x, params.scale, params.bias)
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    expected_mean, expected_var, expected_count = _expected_state(state, mean, var)
    np.testing.assert_allclose(np.asarray(new_state.mean), expected_mean, **SYNC_TOL)
    np.testing.assert_allclose(np.asarray(new_state.var), expected_var, **SYNC_TOL)
    assert int(new_state.count) == expected_count


def test_synchronized_batchrenorm_equals_whole_batch(mesh):
    """Running statistics chosen so that r and d are clipped on some features."""
    x = _input((16, 2, 2, C), -1)
    params = _params()
    state = bnjax.BatchStats(
        mean=jnp.asarray([0.0, 30.0, 1.0], jnp.float32),
        var=jnp.asarray([0.05, 1.0, 20.0], jnp.float32),
        count=jnp.asarray(3, jnp.int32),
    )

    def per_device(params, state, x):
        return bnjax.batchrenorm_apply(params, state, x, True, axis_name="data")

    fn = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())
    )
    y, new_state = jax.jit(fn)(params, state, _split(mesh, x))

    expected = references.batchrenorm(
        x, params.scale, params.bias, np.asarray(state.mean), np.asarray(state.var)
    )
    np.testing.assert_allclose(np.asarray(y), expected[0], **SYNC_TOL)
    _, whole = bnjax.batchrenorm_apply(params, state, jnp.asarray(x), True)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, **SAME_MATH_TOL),
        new_state,
        whole,
    )


# --- masks: pooled by count, not a mean of per-device means -------------------

# Per-device numbers of unmasked entries (in quarters of each shard); device 2
# contributes nothing.
ROWS_PER_DEVICE = [4, 1, 0, 3, 2, 4, 1, 2]
EMPTY_DEVICE = 2


def _unequal_mask(shape, seed=2):
    """A boolean mask of `shape` (its first axis the batch axis).

    Device d's shard keeps a random ROWS_PER_DEVICE[d] / 4 share of its
    entries, so every device has a different count and device 2 has none.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    block = shape[0] // NUM_DEVICES
    per_device = math.prod(shape) // NUM_DEVICES
    for d, rows in enumerate(ROWS_PER_DEVICE):
        keep = rng.permutation(per_device) < rows * per_device // 4
        mask[d * block : (d + 1) * block] = keep.reshape((block,) + shape[1:])
    return mask


# (x shape, feature axis, mask shape), masks in SPEC's shapes: a lower-rank
# mask is aligned with x's leading axes; a same-rank one has size 1 on the
# feature axis. Each device's shard has 4 or 8 mask entries, so the quarters
# of ROWS_PER_DEVICE are exact.
MASK_CASES = [
    ((32, C), -1, (32,)),
    ((32, 2, 2, C), -1, (32,)),
    ((16, 2, 2, C), -1, (16, 2, 2)),
    ((16, 2, 2, C), -1, (16, 2, 2, 1)),
    ((32, C, 2, 2), 1, (32,)),
    ((32, C, 2, 2), 1, (32, 1, 1, 1)),
    ((16, C, 2, 2), 1, (16, 1, 2, 2)),
]
MASK_IDS = [
    "NC-per-example",
    "NHWC-per-example",
    "NHWC-per-pixel",
    "NHWC-per-pixel-full-rank",
    "NCHW-per-example",
    "NCHW-per-example-full-rank",
    "NCHW-per-pixel",
]


@pytest.mark.parametrize("shape, axis, mask_shape", MASK_CASES, ids=MASK_IDS)
def test_masked_statistics_pool_every_devices_unmasked_entries(mesh, shape, axis, mask_shape):
    x = _input(shape, axis)
    mask = _unequal_mask(mask_shape)
    params, state = _params(), _state()

    y, new_states = _shard_apply(mesh, masked=True, axis=axis)(
        params, state, _split(mesh, x), _split(mesh, mask)
    )

    full = _full_rank(mask, x.ndim)
    expected, mean, var = references.batchnorm(x, params.scale, params.bias, axis=axis, mask=full)
    # The data discriminate: a plain mean of the per-device means (over the
    # devices that have any entry) is far from the count-weighted mean.
    shards = zip(np.split(x, NUM_DEVICES), np.split(full, NUM_DEVICES), strict=True)
    device_means = [
        references.batchnorm(xs, None, None, axis=axis, mask=ms)[1] for xs, ms in shards if ms.any()
    ]
    assert len(device_means) == NUM_DEVICES - 1  # one device has no entry
    assert np.min(np.abs(np.mean(device_means, axis=0) - mean)) > 0.1
    _assert_replicated(new_states, NUM_DEVICES)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)
    # Masked entries are normalized too, with the statistics of the unmasked.
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)


def test_devices_without_entries_contribute_nothing_not_zeros(mesh):
    """All devices but one are fully masked: the statistics are that one
    device's, and every device (the empty ones too) normalizes with them and
    holds the same new state."""
    x = _input((32, 2, C), -1)
    mask = np.zeros(32, bool)
    mask[20:23] = True  # three examples of device 5
    params, state = _params(), _state()

    y, new_states = _shard_apply(mesh, masked=True)(
        params, state, _split(mesh, x), _split(mesh, mask)
    )

    expected, mean, var = references.batchnorm(
        x, params.scale, params.bias, mask=_full_rank(mask, x.ndim)
    )
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    _assert_replicated(new_states, NUM_DEVICES)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)


def test_masked_out_on_every_device_keeps_running_statistics(mesh):
    x = _input((16, C), -1)
    params, state = _params(), _state()

    _, new_states = _shard_apply(mesh, masked=True)(
        params, state, _split(mesh, x), _split(mesh, np.zeros(16, bool))
    )
    new_states = _host(new_states)

    for i in range(NUM_DEVICES):
        np.testing.assert_array_equal(new_states.mean[i], state.mean)
        np.testing.assert_array_equal(new_states.var[i], state.var)
        assert int(new_states.count[i]) == int(state.count)


def test_nchw_mask_of_the_old_trailing_shape_raises_under_shard_map(mesh):
    """`(N, H, W)` for NCHW input would reach the feature axis: SPEC asks for
    `(N, 1, H, W)` instead, and nothing is guessed."""
    x = _input((16, C, 2, 2), 1)
    mask = np.ones((16, 2, 2), bool)

    with pytest.raises(ValueError, match=r"`mask`.*rank"):
        _shard_apply(mesh, masked=True, axis=1)(
            _params(), _state(), _split(mesh, x), _split(mesh, mask)
        )


# --- without axis_name, every device keeps to its own shard -------------------


def test_without_axis_name_each_device_uses_its_own_statistics(mesh):
    shape = (16, 4, C)
    x = _input(shape, -1)
    params, state = _params(), _state()

    y, new_states = _shard_apply(mesh, axis_name=None)(params, state, _split(mesh, x))
    new_states = _host(new_states)

    _, whole_mean, _ = references.batchnorm(x, None, None)
    for d, (shard, y_shard) in enumerate(
        zip(np.split(x, NUM_DEVICES), np.split(np.asarray(y), NUM_DEVICES), strict=True)
    ):
        expected, mean, var = references.batchnorm(shard, params.scale, params.bias)
        # The data discriminate: each shard's mean is far from the batch's.
        assert np.min(np.abs(mean - whole_mean)) > 0.1
        np.testing.assert_allclose(y_shard, expected, **SYNC_TOL)
        exp_mean, exp_var, exp_count = _expected_state(state, mean, var)
        np.testing.assert_allclose(new_states.mean[d], exp_mean, **SYNC_TOL)
        np.testing.assert_allclose(new_states.var[d], exp_var, **SYNC_TOL)
        assert int(new_states.count[d]) == exp_count


# --- one value per feature, counted across the synchronized axis --------------


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_one_value_per_instance_trains_when_synchronized(mesh, mapping):
    """Per instance, x has one value per feature ((C,) under vmap, (1, C) per
    device); across the axis there are 8, so training is allowed."""
    x = _input((NUM_DEVICES, C), -1)
    params, state = _params(), _state()
    apply, place = _mapped(mapping, mesh, axis=-1)

    y, new_states = apply(params, state, place(x))

    expected, mean, var = references.batchnorm(x, params.scale, params.bias)
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_one_value_per_instance_without_axis_name_raises(mesh, mapping):
    x = _input((NUM_DEVICES, C), -1)
    params, state = _params(), _state()
    if mapping == "vmap":
        apply, place = _vmap_apply(axis_name=None), jnp.asarray
    else:
        apply, place = _shard_apply(mesh, axis_name=None), lambda a: _split(mesh, a)

    with pytest.raises(ValueError, match="one value per feature"):
        apply(params, state, place(x))


def test_one_value_on_a_mapped_axis_of_size_one_raises():
    """A synchronized axis of one instance still gives one value per feature."""
    x = _input((NUM_DEVICES, C), -1)[:1]
    params, state = _params(), _state()

    with pytest.raises(ValueError, match="one value per feature"):
        _vmap_apply()(params, state, jnp.asarray(x))


# --- an axis_name that is not bound --------------------------------------------


def _call_unmapped(mesh, x, axis_name):
    params, state = _params(), _state()
    return bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis_name=axis_name)


def _call_in_vmap(mesh, x, axis_name):
    params, state = _params(), _state()
    return _vmap_apply(axis_name=axis_name)(params, state, jnp.asarray(x))


def _call_in_shard_map(mesh, x, axis_name):
    params, state = _params(), _state()
    return _shard_apply(mesh, axis_name=axis_name)(params, state, _split(mesh, x))


UNBOUND_CASES = [
    (_call_unmapped, "replica"),
    (_call_in_vmap, "replica"),
    (_call_in_shard_map, "replica"),
    (_call_in_shard_map, ("data", "replica")),
]
UNBOUND_IDS = ["no-map", "vmap", "shard_map", "shard_map-tuple"]


@pytest.mark.parametrize("call, axis_name", UNBOUND_CASES, ids=UNBOUND_IDS)
def test_unbound_axis_name_raises_naming_it(mesh, call, axis_name):
    x = _input((16, 2, C), -1)

    with pytest.raises(ValueError, match="replica"):
        call(mesh, x, axis_name)


# --- numerics: exact and stable across devices ---------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_synchronized_large_mean_is_stable_across_devices(mesh, masked):
    """SPEC's case (per-channel mean 1e4, std 1, float32), split over 8
    devices: the output has unit std and the running variance is the float64
    one. `momentum=0` makes the running statistics the batch's."""
    rng = np.random.default_rng(3)
    shape = (64, 4, C)
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    mask = random_mask(rng, (64,)) if masked else None
    if masked:
        mask[EMPTY_DEVICE * 8 : (EMPTY_DEVICE + 1) * 8] = False  # and one device has none
    params = bnjax.NormParams(jnp.ones(C, jnp.float32), jnp.zeros(C, jnp.float32))
    apply = _shard_apply(mesh, masked=masked, momentum=0.0)

    y, new_states = apply(
        params, _state(), _split(mesh, x), *([_split(mesh, mask)] if masked else [])
    )

    full = None if mask is None else _full_rank(mask, x.ndim)
    _, mean, var = references.batchnorm(x, None, None, mask=full)
    y = np.asarray(y, np.float64)
    counted = y if mask is None else y[mask]
    std = counted.reshape(-1, C).std(axis=0)
    np.testing.assert_allclose(std, 1.0, rtol=0, atol=LARGE_MEAN_TOL)
    new_states = _host(new_states)
    _assert_replicated(new_states, NUM_DEVICES)
    np.testing.assert_allclose(new_states.var[0], var, rtol=LARGE_MEAN_TOL, atol=0)
    np.testing.assert_allclose(new_states.mean[0], mean, **SYNC_TOL)


# --- cost: at most two collectives of O(C) values per call ------------------------


def _two_calls(params, state, x, *mask):
    """Two BatchNorm layers in a row, each synchronized."""
    kwargs = {"axis_name": "data", "mask": mask[0] if mask else None}
    h, state = bnjax.batchnorm_apply(params, state, x, True, **kwargs)
    return bnjax.batchnorm_apply(params, state, h, True, **kwargs)


def _traced_collectives(mesh, per_device, x_shape, mask_shape=None, num_features=C):
    """The collectives in the jaxpr of `per_device(params, state, x, *mask)`
    under a jitted shard_map over `mesh`'s 'data' axis, traced on abstract
    inputs (nothing runs). `x_shape` is the whole batch's."""
    params, state = bnjax.batchnorm_init(num_features)
    split = NamedSharding(mesh, P("data"))
    args = (params, state, jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=split))
    if mask_shape is not None:
        args += (jax.ShapeDtypeStruct(mask_shape, jnp.bool_, sharding=split),)
    in_specs = (P(), P(), P("data")) + ((P("data"),) if mask_shape is not None else ())
    # Only the collectives are looked at here; whether the state may leave as
    # replicated under shard_map's checks is the out_specs test's business.
    fn = jax.shard_map(
        per_device, mesh=mesh, in_specs=in_specs, out_specs=(P("data"), P()), check_vma=False
    )
    with jax.set_mesh(mesh):
        return _collectives(jax.make_jaxpr(jax.jit(fn))(*args).jaxpr)


def _one_call(train, **kwargs):
    def per_device(params, state, x, *mask):
        return bnjax.batchnorm_apply(
            params, state, x, train, axis_name="data", mask=mask[0] if mask else None, **kwargs
        )

    return per_device


def _renorm_call(params, state, x, *mask):
    return bnjax.batchrenorm_apply(
        params, state, x, True, axis_name="data", mask=mask[0] if mask else None
    )


# (per-device function, masked, (fewest, most) collectives it may make).
COLLECTIVE_CASES = [
    (_one_call(True), False, (1, 2)),
    (_one_call(True), True, (1, 2)),
    (_renorm_call, True, (1, 2)),
    (_one_call(True, virtual_batch_size=2), False, (1, 1)),
    (_one_call(True, virtual_batch_size=2), True, (1, 1)),
    (_two_calls, False, (2, 4)),
    (_two_calls, True, (2, 4)),
    (_one_call(False), False, (0, 0)),
]
COLLECTIVE_IDS = [
    "train",
    "train-masked",
    "batchrenorm-masked",
    "ghost",
    "ghost-masked",
    "two-calls",
    "two-calls-masked",
    "eval",
]


@pytest.mark.parametrize("per_device, masked, bounds", COLLECTIVE_CASES, ids=COLLECTIVE_IDS)
def test_at_most_two_collectives_per_synchronized_call(mesh, per_device, masked, bounds):
    """Counted in the jaxpr, through every sub-jaxpr. The lower bound keeps
    the count honest: a training call that synchronizes shows up in it."""
    collectives = _traced_collectives(mesh, per_device, (16, 4, C), (16, 4) if masked else None)

    fewest, most = bounds
    names = [eqn.primitive.name for eqn in collectives]
    assert fewest <= len(collectives) <= most, names


# Per-device batch (4, 3, C) with C = 5, whatever the number of devices.
PAYLOAD_FEATURES = 5
PAYLOAD_DEVICE_COUNTS = (2, 4, 8)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_collective_payload_does_not_grow_with_the_number_of_devices(masked):
    """The same per-device batch on meshes of 2, 4 and 8 devices: the
    collectives move the same number of values, O(C) (SPEC: not O(devices x C)),
    in at most two collectives."""
    payloads, counts = {}, {}
    for n in PAYLOAD_DEVICE_COUNTS:
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        collectives = _traced_collectives(
            mesh,
            _one_call(True),
            (4 * n, 3, PAYLOAD_FEATURES),
            (4 * n, 3) if masked else None,
            num_features=PAYLOAD_FEATURES,
        )
        payloads[n] = _payload(collectives)
        counts[n] = [eqn.primitive.name for eqn in collectives]

    assert len(set(payloads.values())) == 1, payloads
    assert payloads[2] <= 4 * PAYLOAD_FEATURES + 2, payloads
    for n, names in counts.items():
        assert 1 <= len(names) <= 2, (n, names)


# --- global-view data parallelism (no shard_map, no axis_name) -----------------


@pytest.mark.parametrize("under_set_mesh", [True, False], ids=["set_mesh", "no_mesh_context"])
@pytest.mark.parametrize(
    "axis_type",
    [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto],
    ids=["explicit", "auto"],
)
def test_jit_on_a_batch_sharded_over_the_mesh_gives_whole_batch_statistics(
    axis_type, under_set_mesh
):
    """Under jit, a batch laid out over the devices is still one batch: the
    compiler partitions the reductions, no axis_name is involved. Explicit
    axes are what `jax.make_mesh` gives by default; the mesh travels with
    the sharded batch, so no `jax.set_mesh` is needed."""
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
    x = _input((16, C), -1)
    params, state = _params(), _state()

    def apply(params, state, x):
        return bnjax.batchnorm_apply(params, state, x, True)

    with jax.set_mesh(mesh) if under_set_mesh else contextlib.nullcontext():
        y, new_state = jax.jit(apply)(params, state, _split(mesh, x))

    expected, mean, var = references.batchnorm(x, params.scale, params.bias)
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    exp_mean, exp_var, exp_count = _expected_state(state, mean, var)
    np.testing.assert_allclose(new_state.mean, exp_mean, **SYNC_TOL)
    np.testing.assert_allclose(new_state.var, exp_var, **SYNC_TOL)
    assert int(new_state.count) == exp_count


# --- the legacy pmap --------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_pmap_synchronized_output_state_and_gradients_equal_whole_batch(shape, axis):
    """Under `pmap` (no mesh context: pmap and a current mesh do not mix)."""
    x = _input(shape, axis)
    dy = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    params, state = _params(), _state()

    def per_device(params, x):
        return bnjax.batchnorm_apply(params, state, x, True, axis=axis, axis_name="data")

    mapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0))
    blocks = (NUM_DEVICES, -1, *shape[1:])

    def mapped_loss(params, x):
        y, _ = mapped(params, x.reshape(blocks))
        return jnp.sum(y.reshape(shape) * dy), y.reshape(shape)

    def whole_loss(params, x):
        y, _ = bnjax.batchnorm_apply(params, state, x, True, axis=axis)
        return jnp.sum(y * dy)

    (_, y), grads = jax.value_and_grad(mapped_loss, argnums=(0, 1), has_aux=True)(
        params, jnp.asarray(x)
    )
    _, new_states = mapped(params, jnp.asarray(x).reshape(blocks))

    expected, mean, var = references.batchnorm(x, params.scale, params.bias, axis=axis)
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    _assert_replicated(new_states, NUM_DEVICES)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)
    want = jax.grad(whole_loss, argnums=(0, 1))(params, jnp.asarray(x))
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, **SYNC_GRAD_TOL)


# --- ghost batches across devices ---------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_synchronized_ghost_batchnorm_averages_the_groups_of_every_device(mesh, masked):
    """Each device normalizes its own groups; the running update averages the
    groups of all devices, so the result is ghost BatchNorm on the whole batch."""
    shape, size = (32, 3, 3, C), 2  # four examples, two groups, per device
    x = _input(shape, -1)
    # Every group keeps its first example and, on some devices, its second.
    keep = [[True, d % 2 == 0, True, d % 3 == 0] for d in range(NUM_DEVICES)]
    mask = np.asarray(keep).reshape(-1, 1, 1) if masked else None
    params, state = _params(), _state()
    apply = _shard_apply(mesh, masked=masked, virtual_batch_size=size)

    y, new_states = apply(params, state, _split(mesh, x), *([_split(mesh, mask)] if masked else []))

    expected, mean, var = references.ghost_batchnorm(
        x,
        params.scale,
        params.bias,
        virtual_batch_size=size,
        mask=None if mask is None else mask[..., None],
    )
    np.testing.assert_allclose(np.asarray(y), expected, **SYNC_TOL)
    _assert_replicated(new_states, NUM_DEVICES)
    _assert_state_close(new_states, _expected_state(state, mean, var), SYNC_TOL)
