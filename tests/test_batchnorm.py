"""BatchNorm against independent references: numpy-ml and float64 numpy.

Every expected value comes from `references` (float64 numpy or numpy-ml's
hand-written layers), never from bnjax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import references
from tests.helpers import random_input, random_mask, random_params
from tests.tolerances import GRAD_TOL, LARGE_MEAN_TOL, TOL

# (shape, feature axis) for every layout the tests run over.
LAYOUTS = [
    ((16, 3), -1),
    ((4, 5, 3), -1),
    ((3, 4, 5, 3), -1),
    ((2, 3, 4, 3, 2), -1),
    ((3, 2, 4, 5), 1),
    ((2, 2, 3, 4, 3), 1),
]
LAYOUT_IDS = ["NC", "NTC", "NHWC", "NDHWC", "NCHW", "NCDHW"]


def _feature_axis_last(x, axis):
    return np.moveaxis(np.asarray(x, np.float64), axis, -1)


# --- numpy-ml: forward, running statistics and backward ---------------------

NUMPY_ML_CASES = [("BatchNorm1D", (16, 4)), ("BatchNorm2D", (3, 4, 5, 3))]
NUMPY_ML_IDS = ["BatchNorm1D-NC", "BatchNorm2D-NHWC"]


@pytest.mark.parametrize("name, shape", NUMPY_ML_CASES, ids=NUMPY_ML_IDS)
def test_train_output_matches_numpy_ml(name, shape):
    rng = np.random.default_rng(0)
    x = random_input(rng, shape)
    params = random_params(rng, shape[-1])
    layer = references.numpy_ml_layer(name, shape, params.scale, params.bias)
    state = bnjax.batchnorm_init(shape[-1])[1]

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True)

    np.testing.assert_allclose(y, layer.forward(x.astype(np.float64)), **TOL["float32"])


@pytest.mark.parametrize("momentum", [0.9, 0.6], ids=["m0.9", "m0.6"])
@pytest.mark.parametrize("name, shape", NUMPY_ML_CASES, ids=NUMPY_ML_IDS)
def test_running_stats_match_numpy_ml_after_several_batches(name, shape, momentum):
    rng = np.random.default_rng(1)
    params = random_params(rng, shape[-1])
    layer = references.numpy_ml_layer(name, shape, params.scale, params.bias, momentum=momentum)
    state = bnjax.batchnorm_init(shape[-1])[1]
    for step in range(4):
        x = (random_input(rng, shape) * (step + 1)).astype(np.float32)
        _, state = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, momentum=momentum)
        layer.forward(x.astype(np.float64))

    np.testing.assert_allclose(state.mean, layer.parameters["running_mean"], **TOL["float32"])
    np.testing.assert_allclose(state.var, layer.parameters["running_var"], **TOL["float32"])


@pytest.mark.parametrize("name, shape", NUMPY_ML_CASES, ids=NUMPY_ML_IDS)
def test_gradients_match_numpy_ml_backward(name, shape):
    rng = np.random.default_rng(2)
    x = random_input(rng, shape)
    dy = rng.normal(size=shape).astype(np.float32)
    params = random_params(rng, shape[-1])
    state = bnjax.batchnorm_init(shape[-1])[1]
    layer = references.numpy_ml_layer(name, shape, params.scale, params.bias)
    layer.forward(x.astype(np.float64))
    expected_dx = layer.backward(dy.astype(np.float64))

    def loss(x, params):
        y, _ = bnjax.batchnorm_apply(params, state, x, True)
        return jnp.sum(y * dy)

    dx, dparams = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)

    np.testing.assert_allclose(dx, expected_dx, **GRAD_TOL["float32"])
    np.testing.assert_allclose(dparams.scale, layer.gradients["scaler"], **GRAD_TOL["float32"])
    np.testing.assert_allclose(dparams.bias, layer.gradients["intercept"], **GRAD_TOL["float32"])


# --- Initial values -----------------------------------------------------------


def test_init_gives_unit_scale_zero_bias_and_standard_running_stats():
    params, state = bnjax.batchnorm_init(3)

    np.testing.assert_array_equal(params.scale, np.ones(3))
    np.testing.assert_array_equal(params.bias, np.zeros(3))
    np.testing.assert_array_equal(state.mean, np.zeros(3))
    np.testing.assert_array_equal(state.var, np.ones(3))
    assert state.count.shape == () and state.count.dtype == jnp.int32 and state.count == 0
    assert {a.dtype for a in (params.scale, params.bias, state.mean, state.var)} == {
        jnp.dtype(jnp.float32)
    }


@pytest.mark.parametrize(
    "use_scale, use_bias",
    [(False, True), (True, False), (False, False)],
    ids=["no-scale", "no-bias", "neither"],
)
def test_init_without_scale_or_bias_gives_none_fields(use_scale, use_bias):
    params, _ = bnjax.batchnorm_init(3, use_scale=use_scale, use_bias=use_bias)

    assert (params.scale is None) == (not use_scale)
    assert (params.bias is None) == (not use_bias)


# --- Training mode against float64 numpy ------------------------------------


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_train_output_matches_float64_reference(shape, axis):
    rng = np.random.default_rng(3)
    x = random_input(rng, shape)
    num_features = shape[axis]
    params = random_params(rng, num_features)
    state = bnjax.batchnorm_init(num_features)[1]

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis)

    expected, _, _ = references.batchnorm(x, params.scale, params.bias, axis=axis)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis", [LAYOUTS[1], LAYOUTS[4]], ids=["NTC", "NCHW"])
def test_float64_train_output_matches_float64_reference(x64, shape, axis):
    rng = np.random.default_rng(3)
    x = random_input(rng, shape, np.float64)
    num_features = shape[axis]
    params = random_params(rng, num_features)
    state = bnjax.batchnorm_init(num_features)[1]

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis)

    expected, _, _ = references.batchnorm(x, params.scale, params.bias, axis=axis)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, expected, **TOL["float64"])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_epsilon_is_added_to_the_variance(train):
    rng = np.random.default_rng(30)
    shape, axis = LAYOUTS[4]
    # Spread 0.01 (variance 1e-4): epsilon = 1e-3 dominates the denominator.
    x = (random_input(rng, shape) * 0.01).astype(np.float32)
    params = random_params(rng, shape[axis])
    state = _running_state(rng, shape[axis])
    state = state._replace(var=state.var * 1e-4)

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), train, axis=axis, epsilon=1e-3)

    if train:
        expected, _, _ = references.batchnorm(x, params.scale, params.bias, axis=axis, epsilon=1e-3)
    else:
        expected = references.batchnorm_eval(
            x, params.scale, params.bias, state.mean, state.var, axis=axis, epsilon=1e-3
        )
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "use_scale, use_bias",
    [(False, True), (True, False), (False, False)],
    ids=["no-scale", "no-bias", "neither"],
)
@pytest.mark.parametrize("shape, axis", [LAYOUTS[2], LAYOUTS[4]], ids=["NHWC", "NCHW"])
def test_train_output_without_scale_or_bias_matches_float64_reference(
    shape, axis, use_scale, use_bias
):
    rng = np.random.default_rng(4)
    x = random_input(rng, shape)
    num_features = shape[axis]
    state = bnjax.batchnorm_init(num_features)[1]
    random = random_params(rng, num_features)
    params = bnjax.NormParams(
        random.scale if use_scale else None, random.bias if use_bias else None
    )

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis)

    expected, _, _ = references.batchnorm(x, params.scale, params.bias, axis=axis)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis", [LAYOUTS[0], LAYOUTS[4]], ids=["NC", "NCHW"])
def test_constant_channel_gives_bias(shape, axis):
    rng = np.random.default_rng(5)
    num_features = shape[axis]
    params = random_params(rng, num_features)
    state = bnjax.batchnorm_init(num_features)[1]
    levels = np.array([3.25, -1e4, 0.0])[:num_features].reshape(
        [num_features if a == axis % len(shape) else 1 for a in range(len(shape))]
    )
    x = np.broadcast_to(levels, shape).astype(np.float32)

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis)

    expected = references.affine(np.zeros(shape), None, params.bias, axis)
    np.testing.assert_array_equal(y, expected.astype(np.float32))


# --- Eval mode ----------------------------------------------------------------


def _running_state(rng, num_features, dtype=jnp.float32):
    """A non-trivial running state, as after some training."""
    return bnjax.BatchStats(
        mean=jnp.asarray(rng.normal(size=num_features) * 2, dtype),
        var=jnp.asarray(rng.uniform(0.3, 3.0, num_features), dtype),
        count=jnp.asarray(7, jnp.int32),
    )


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_eval_output_matches_float64_reference_with_running_stats(shape, axis):
    rng = np.random.default_rng(6)
    x = random_input(rng, shape)
    num_features = shape[axis]
    params = random_params(rng, num_features)
    state = _running_state(rng, num_features)

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), False, axis=axis)

    expected = references.batchnorm_eval(
        x, params.scale, params.bias, state.mean, state.var, axis=axis
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])


def test_eval_output_matches_frozen_numpy_ml_layer():
    rng = np.random.default_rng(7)
    shape = (3, 4, 5, 3)
    x = random_input(rng, shape)
    params = random_params(rng, shape[-1])
    state = _running_state(rng, shape[-1])
    layer = references.numpy_ml_layer("BatchNorm2D", shape, params.scale, params.bias)
    layer.parameters["running_mean"] = np.asarray(state.mean, np.float64)
    layer.parameters["running_var"] = np.asarray(state.var, np.float64)
    layer.freeze()

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), False)

    np.testing.assert_allclose(y, layer.forward(x.astype(np.float64)), **TOL["float32"])


def test_eval_returns_state_unchanged():
    rng = np.random.default_rng(8)
    x = random_input(rng, (3, 4, 5, 3))
    params = random_params(rng, 3)
    state = _running_state(rng, 3)

    _, new_state = bnjax.batchnorm_apply(params, state, jnp.asarray(x), False)

    assert new_state is state or all(
        np.array_equal(new, old) and new.dtype == old.dtype
        for new, old in zip(new_state, state, strict=True)
    )


@pytest.mark.parametrize(
    "shape, axis, mask_shape",
    [((16, 3), -1, (16,)), ((3, 4, 5, 3), -1, (3, 4, 5)), ((3, 2, 4, 5), 1, (3, 1, 1, 1))],
    ids=["NC-(N,)", "NHWC-(N,H,W)", "NCHW-(N,1,1,1)"],
)
def test_eval_ignores_mask(shape, axis, mask_shape):
    rng = np.random.default_rng(9)
    x = jnp.asarray(random_input(rng, shape))
    params = random_params(rng, shape[axis])
    state = _running_state(rng, shape[axis])
    mask = np.zeros(mask_shape, bool)
    mask.flat[::2] = True

    y_masked, new_state = bnjax.batchnorm_apply(params, state, x, False, axis=axis, mask=mask)
    y, _ = bnjax.batchnorm_apply(params, state, x, False, axis=axis)

    np.testing.assert_array_equal(y_masked, y)
    for new, old in zip(new_state, state, strict=True):
        np.testing.assert_array_equal(new, old)


# --- Running statistics: exact closed forms -----------------------------------


def _batches(rng, shape, k):
    """k batches whose statistics differ from step to step."""
    return [(random_input(rng, shape) * (1 + step) + step).astype(np.float32) for step in range(k)]


def _batch_stats(x, axis=-1):
    _, mean, var = references.batchnorm(x, None, None, axis=axis)
    return mean, var


@pytest.mark.parametrize("momentum", [0.9, 0.5], ids=["m0.9", "m0.5"])
@pytest.mark.parametrize(
    "shape, axis", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]], ids=["NC", "NDHWC", "NCHW"]
)
def test_running_stats_after_one_step_follow_closed_form(shape, axis, momentum):
    rng = np.random.default_rng(10)
    (x,) = _batches(rng, shape, 1)
    params, state = bnjax.batchnorm_init(shape[axis])

    _, new_state = bnjax.batchnorm_apply(
        params, state, jnp.asarray(x), True, axis=axis, momentum=momentum
    )

    batch_mean, batch_var = _batch_stats(x, axis)
    np.testing.assert_allclose(new_state.mean, (1 - momentum) * batch_mean, **TOL["float32"])
    np.testing.assert_allclose(
        new_state.var, momentum * 1 + (1 - momentum) * batch_var, **TOL["float32"]
    )


@pytest.mark.parametrize("shape, axis", [LAYOUTS[1], LAYOUTS[4]], ids=["NTC", "NCHW"])
def test_running_stats_after_k_steps_follow_recursion(shape, axis):
    rng = np.random.default_rng(11)
    batches = _batches(rng, shape, 4)
    params, state = bnjax.batchnorm_init(shape[axis])
    for x in batches:
        _, state = bnjax.batchnorm_apply(
            params, state, jnp.asarray(x), True, axis=axis, momentum=0.8
        )

    stats = [_batch_stats(x, axis) for x in batches]
    mean, var = references.running_stats([m for m, _ in stats], [v for _, v in stats], 0.8)
    np.testing.assert_allclose(state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, var, **TOL["float32"])


@pytest.mark.parametrize("momentum", [0.9, None], ids=["m0.9", "cumulative"])
def test_count_increments_by_one_per_training_call_and_is_int32(momentum):
    rng = np.random.default_rng(12)
    params, state = bnjax.batchnorm_init(3)
    counts = []
    for x in _batches(rng, (8, 3), 3):
        _, state = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, momentum=momentum)
        counts.append(state.count)

    assert [int(c) for c in counts] == [1, 2, 3]
    assert all(c.dtype == jnp.int32 and c.shape == () for c in counts)


def test_eval_does_not_increment_count():
    rng = np.random.default_rng(13)
    params, state = bnjax.batchnorm_init(3)
    _, state = bnjax.batchnorm_apply(params, state, jnp.asarray(random_input(rng, (8, 3))), True)

    _, state = bnjax.batchnorm_apply(params, state, jnp.asarray(random_input(rng, (8, 3))), False)

    assert int(state.count) == 1


@pytest.mark.parametrize("k", [1, 2, 5])
def test_momentum_none_gives_plain_average_of_batch_statistics(k):
    rng = np.random.default_rng(14)
    shape, axis = LAYOUTS[4]
    batches = _batches(rng, shape, k)
    params, state = bnjax.batchnorm_init(shape[axis])
    for x in batches:
        _, state = bnjax.batchnorm_apply(
            params, state, jnp.asarray(x), True, axis=axis, momentum=None
        )

    stats = [_batch_stats(x, axis) for x in batches]
    mean, var = references.running_stats([m for m, _ in stats], [v for _, v in stats], None)
    np.testing.assert_allclose(state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, var, **TOL["float32"])
    assert int(state.count) == k


def test_momentum_zero_gives_last_batch_statistics():
    rng = np.random.default_rng(15)
    shape, axis = LAYOUTS[2]
    batches = _batches(rng, shape, 3)
    params, state = bnjax.batchnorm_init(shape[axis])
    for x in batches:
        _, state = bnjax.batchnorm_apply(
            params, state, jnp.asarray(x), True, axis=axis, momentum=0.0
        )

    mean, var = _batch_stats(batches[-1], axis)
    np.testing.assert_allclose(state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, var, **TOL["float32"])


def test_momentum_one_keeps_running_statistics():
    rng = np.random.default_rng(16)
    shape, axis = LAYOUTS[2]
    params = random_params(rng, shape[axis])
    state = _running_state(rng, shape[axis])
    new_state = state
    for x in _batches(rng, shape, 3):
        _, new_state = bnjax.batchnorm_apply(
            params, new_state, jnp.asarray(x), True, axis=axis, momentum=1.0
        )

    np.testing.assert_array_equal(new_state.mean, state.mean)
    np.testing.assert_array_equal(new_state.var, state.var)


# --- Masks --------------------------------------------------------------------

# (x shape, feature axis, mask shape), by SPEC's mask rule: a lower-rank mask
# is aligned with x's leading axes and must stop before the feature axis; a
# mask of x's rank has size 1 on the feature axis.
MASK_CASES = [
    ((12, 3), -1, (12,)),
    ((4, 3, 5, 2), -1, (4, 1, 1)),
    ((4, 3, 5, 2), -1, (4, 3, 5)),
    ((4, 2, 3, 5), 1, (4, 1, 1, 1)),
    ((4, 2, 3, 5), 1, (4, 1, 3, 5)),
    ((4, 2, 3, 5), 1, (4,)),
]
MASK_IDS = [
    "NC-(N,)",
    "NHWC-(N,1,1)",
    "NHWC-(N,H,W)",
    "NCHW-(N,1,1,1)",
    "NCHW-(N,1,H,W)",
    "NCHW-(N,)",
]


def _unmasked_entries(mask, x_shape, axis):
    """Where an entry counts, feature axis removed: boolean of x's shape without `axis`."""
    return np.take(references.full_mask(mask, x_shape), 0, axis=axis)


def _split_by_mask(x, axis, mask):
    """Entries of x as (M, C) rows, feature axis last: (unmasked, masked)."""
    x_last = _feature_axis_last(x, axis)
    unmasked = _unmasked_entries(mask, np.shape(x), axis)
    return x_last[unmasked], x_last[~unmasked]


def _masked_case(seed, shape, axis, mask_shape):
    rng = np.random.default_rng(seed)
    x = random_input(rng, shape)
    # Masked-out entries hold values far from the others: they must not leak in.
    mask = random_mask(rng, mask_shape)
    np.moveaxis(x, axis, -1)[~_unmasked_entries(mask, shape, axis)] *= 50.0
    params = random_params(rng, shape[axis])
    return x, mask, params


@pytest.mark.parametrize("shape, axis, mask_shape", MASK_CASES, ids=MASK_IDS)
def test_masked_statistics_match_reference_on_unmasked_entries(shape, axis, mask_shape):
    x, mask, params = _masked_case(17, shape, axis, mask_shape)
    state = bnjax.batchnorm_init(shape[axis])[1]

    # momentum=0 makes the running statistics the batch statistics.
    _, new_state = bnjax.batchnorm_apply(
        params, state, jnp.asarray(x), True, axis=axis, mask=mask, momentum=0.0
    )

    unmasked, _ = _split_by_mask(x, axis, mask)
    _, mean, var = references.batchnorm(unmasked, None, None)
    np.testing.assert_allclose(new_state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(new_state.var, var, **TOL["float32"])
    assert int(new_state.count) == 1


@pytest.mark.parametrize("shape, axis, mask_shape", MASK_CASES, ids=MASK_IDS)
def test_masked_output_matches_reference_on_unmasked_entries(shape, axis, mask_shape):
    x, mask, params = _masked_case(18, shape, axis, mask_shape)
    state = bnjax.batchnorm_init(shape[axis])[1]

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis, mask=mask)

    unmasked, _ = _split_by_mask(x, axis, mask)
    expected, _, _ = references.batchnorm(unmasked, params.scale, params.bias)
    y_unmasked, _ = _split_by_mask(y, axis, mask)
    np.testing.assert_allclose(y_unmasked, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis, mask_shape", MASK_CASES, ids=MASK_IDS)
def test_masked_entries_are_normalized_with_unmasked_statistics(shape, axis, mask_shape):
    x, mask, params = _masked_case(19, shape, axis, mask_shape)
    state = bnjax.batchnorm_init(shape[axis])[1]

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, axis=axis, mask=mask)

    unmasked, masked = _split_by_mask(x, axis, mask)
    _, mean, var = references.batchnorm(unmasked, None, None)
    expected = references.batchnorm_eval(masked, params.scale, params.bias, mean, var)
    _, y_masked = _split_by_mask(y, axis, mask)
    # The masked inputs are ~50x larger, so their outputs are too.
    np.testing.assert_allclose(y_masked, expected, rtol=TOL["float32"]["rtol"], atol=50 * 1e-5)


@pytest.mark.parametrize("momentum", [0.9, None], ids=["m0.9", "cumulative"])
@pytest.mark.parametrize("shape, axis, mask_shape", MASK_CASES[::2], ids=MASK_IDS[::2])
def test_fully_masked_batch_leaves_running_state_and_count_unchanged(
    shape, axis, mask_shape, momentum
):
    rng = np.random.default_rng(20)
    x = jnp.asarray(random_input(rng, shape))
    params = random_params(rng, shape[axis])
    state = _running_state(rng, shape[axis])

    _, new_state = bnjax.batchnorm_apply(
        params, state, x, True, axis=axis, mask=np.zeros(mask_shape, bool), momentum=momentum
    )

    for new, old in zip(new_state, state, strict=True):
        np.testing.assert_array_equal(new, old)
        assert new.dtype == old.dtype


@pytest.mark.parametrize("shape, axis, mask_shape", MASK_CASES[::2], ids=MASK_IDS[::2])
def test_fully_masked_batch_gives_finite_output(shape, axis, mask_shape):
    rng = np.random.default_rng(21)
    x = jnp.asarray(random_input(rng, shape))
    params = random_params(rng, shape[axis])
    state = bnjax.batchnorm_init(shape[axis])[1]

    y, _ = bnjax.batchnorm_apply(params, state, x, True, axis=axis, mask=np.zeros(mask_shape, bool))

    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(np.isfinite(y))


# --- Large mean: the variance must be numerically stable ----------------------


def _unit_normal(rng, shape):
    """Float64 samples with exactly mean 0 and std 1 along axis 0."""
    z = rng.normal(size=shape)
    return (z - z.mean(axis=0)) / z.std(axis=0)


def _large_mean_input(rng, num_rows, num_features):
    """(num_rows, C) float32: channel 0 has mean 1e4 and std 1, the others O(1)."""
    x = _unit_normal(rng, (num_rows, num_features))
    x[:, 0] += 1e4
    return x.astype(np.float32)


def test_large_mean_channel_comes_out_with_unit_std():
    rng = np.random.default_rng(22)
    x = _large_mean_input(rng, 512, 3).reshape(8, 8, 8, 3)
    params, state = bnjax.batchnorm_init(3)

    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True)

    y = np.asarray(y, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=0, atol=LARGE_MEAN_TOL)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, rtol=0, atol=LARGE_MEAN_TOL)


def test_large_mean_channel_gives_running_var_close_to_one():
    rng = np.random.default_rng(23)
    x = _large_mean_input(rng, 512, 3).reshape(8, 8, 8, 3)
    params, state = bnjax.batchnorm_init(3)

    _, new_state = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True, momentum=0.0)

    _, mean, var = references.batchnorm(x, None, None)
    np.testing.assert_allclose(new_state.var, 1.0, rtol=0, atol=LARGE_MEAN_TOL)
    np.testing.assert_allclose(new_state.var, var, rtol=LARGE_MEAN_TOL, atol=0)
    np.testing.assert_allclose(new_state.mean, mean, **TOL["float32"])


# (x shape, mask shape, rows of garbage at the start of axis 0)
LARGE_MEAN_MASK_CASES = [((64, 3), (64,), 8), ((8, 8, 8, 3), (8, 1, 1), 2)]


@pytest.mark.parametrize("garbage", [0.0, 1e8], ids=["garbage0", "garbage1e8"])
@pytest.mark.parametrize(
    "shape, mask_shape, num_garbage", LARGE_MEAN_MASK_CASES, ids=["NC-(N,)", "NHWC-(N,1,1)"]
)
def test_large_mean_with_masked_garbage_rows_comes_out_with_unit_std(
    shape, mask_shape, num_garbage, garbage
):
    rng = np.random.default_rng(24)
    x = _large_mean_input(rng, int(np.prod(shape[:-1])), shape[-1]).reshape(shape)
    x[:num_garbage] = garbage
    mask = np.ones(mask_shape, bool)
    mask[:num_garbage] = False
    params, state = bnjax.batchnorm_init(shape[-1])

    y, new_state = bnjax.batchnorm_apply(
        params, state, jnp.asarray(x), True, mask=mask, momentum=0.0
    )

    unmasked, _ = _split_by_mask(x, -1, mask)
    _, _, var = references.batchnorm(unmasked, None, None)
    y_unmasked, _ = _split_by_mask(y, -1, mask)
    np.testing.assert_allclose(y_unmasked.std(axis=0), 1.0, rtol=0, atol=LARGE_MEAN_TOL)
    np.testing.assert_allclose(new_state.var, var, rtol=LARGE_MEAN_TOL, atol=0)


# --- dtypes -------------------------------------------------------------------

LOW_PRECISION = [jnp.bfloat16, jnp.float16]
LOW_PRECISION_IDS = ["bfloat16", "float16"]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_low_precision_input_gives_output_of_input_dtype_and_float32_state(dtype, train):
    rng = np.random.default_rng(25)
    x = jnp.asarray(random_input(rng, (4, 3, 5, 3)), dtype)
    params, state = bnjax.batchnorm_init(3)

    y, new_state = bnjax.batchnorm_apply(params, state, x, train)

    assert y.dtype == dtype
    assert new_state.mean.dtype == jnp.float32 and new_state.var.dtype == jnp.float32
    assert new_state.count.dtype == jnp.int32
    assert params.scale.dtype == jnp.float32 and params.bias.dtype == jnp.float32


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize(
    "shape, axis", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[4]], ids=["NC", "NHWC", "NCHW"]
)
def test_low_precision_output_matches_float64_reference_on_rounded_input(shape, axis, dtype):
    rng = np.random.default_rng(26)
    x = jnp.asarray(random_input(rng, shape), dtype)
    params = random_params(rng, shape[axis])
    state = bnjax.batchnorm_init(shape[axis])[1]

    y, _ = bnjax.batchnorm_apply(params, state, x, True, axis=axis)

    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    expected, _, _ = references.batchnorm(rounded, params.scale, params.bias, axis=axis)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_statistics_are_accumulated_in_float32(dtype):
    rng = np.random.default_rng(27)
    # 4096 entries per channel: a bfloat16/float16 accumulator would be off by
    # far more than the float32 tolerance.
    x = jnp.asarray(random_input(rng, (16, 16, 16, 2)) + 3.0, dtype)
    params, state = bnjax.batchnorm_init(2)

    _, new_state = bnjax.batchnorm_apply(params, state, x, True, momentum=0.0)

    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    _, mean, var = references.batchnorm(rounded, None, None)
    np.testing.assert_allclose(new_state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(new_state.var, var, **TOL["float32"])


def test_float16_input_around_300_does_not_overflow():
    rng = np.random.default_rng(28)
    # 4096 entries per channel around 300: their sum (~1.2e6) and the sum of
    # squared deviations exceed float16's largest value, 65504.
    x = jnp.asarray(300 + 30 * rng.normal(size=(16, 16, 16, 2)), jnp.float16)
    params = random_params(rng, 2)
    state = bnjax.batchnorm_init(2)[1]

    y, new_state = bnjax.batchnorm_apply(params, state, x, True, momentum=0.0)

    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    expected, mean, var = references.batchnorm(rounded, params.scale, params.bias)
    assert np.all(np.isfinite(np.asarray(y, np.float64)))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL["float16"])
    np.testing.assert_allclose(new_state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(new_state.var, var, **TOL["float32"])


def test_param_dtype_float64_gives_float64_params_and_state(x64):
    rng = np.random.default_rng(29)
    params, state = bnjax.batchnorm_init(3, param_dtype=jnp.float64)
    x = random_input(rng, (3, 4, 5, 3), np.float64)

    y, new_state = bnjax.batchnorm_apply(params, state, jnp.asarray(x), True)

    assert params.scale.dtype == jnp.float64 and params.bias.dtype == jnp.float64
    assert state.mean.dtype == jnp.float64 and state.var.dtype == jnp.float64
    assert new_state.mean.dtype == jnp.float64 and new_state.var.dtype == jnp.float64
    assert state.count.dtype == jnp.int32 and new_state.count.dtype == jnp.int32
    expected, mean, var = references.batchnorm(x, None, None)
    np.testing.assert_allclose(y, expected, **TOL["float64"])
    np.testing.assert_allclose(new_state.mean, 0.1 * mean, **TOL["float64"])
    np.testing.assert_allclose(new_state.var, 0.9 + 0.1 * var, **TOL["float64"])
