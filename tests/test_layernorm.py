"""LayerNorm against independent references: numpy-ml and float64 numpy.

Every expected value comes from `references` (float64 numpy or numpy-ml's
hand-written layers), never from bnjax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import helpers, references
from tests.helpers import random_examples, random_params
from tests.tolerances import GRAD_TOL, LARGE_MEAN_TOL, TOL

# (shape, normalized axes) over the last axis, for every layout.
LAST_AXIS_CASES = [(6, 5), (4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 2, 4)]
LAST_AXIS_IDS = ["NC", "NTC", "NHWC", "NDHWC"]
# Tuples of normalized axes, some not contiguous and some not sorted.
AXES_CASES = [
    ((2, 3, 4, 5), (1, 3)),
    ((2, 3, 4, 5), (3, 1)),
    ((2, 3, 4, 5), (-3, -2, -1)),
    ((2, 3, 2, 4, 3), (1, 3)),
    ((2, 3, 2, 4, 3), (0, 2, 4)),
]
AXES_IDS = ["NHWC-(1,3)", "NHWC-(3,1)", "NHWC-(-3,-2,-1)", "NDHWC-(1,3)", "NDHWC-(0,2,4)"]


def _feature_shape(shape, axis):
    """Shape of the normalized axes, in increasing axis order."""
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def _axes(axis):
    return (axis,) if isinstance(axis, int) else tuple(axis)


# --- numpy-ml: forward and backward ------------------------------------------

# (numpy-ml layer, input shape, the matching bnjax axis)
NUMPY_ML_CASES = [("LayerNorm1D", (6, 7), -1), ("LayerNorm2D", (3, 4, 5, 3), (-3, -2, -1))]
NUMPY_ML_IDS = ["LayerNorm1D-NC", "LayerNorm2D-NHWC"]


@pytest.mark.parametrize("name, shape, axis", NUMPY_ML_CASES, ids=NUMPY_ML_IDS)
def test_output_matches_numpy_ml(name, shape, axis):
    rng = np.random.default_rng(0)
    x = random_examples(rng, shape)
    params = random_params(rng, _feature_shape(shape, axis))
    layer = references.numpy_ml_layer(name, shape, params.scale, params.bias)

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    np.testing.assert_allclose(y, layer.forward(x.astype(np.float64)), **TOL["float32"])


@pytest.mark.parametrize("name, shape, axis", NUMPY_ML_CASES, ids=NUMPY_ML_IDS)
def test_gradients_match_numpy_ml_backward(name, shape, axis):
    rng = np.random.default_rng(1)
    x = random_examples(rng, shape)
    dy = rng.normal(size=shape).astype(np.float32)
    params = random_params(rng, _feature_shape(shape, axis))
    layer = references.numpy_ml_layer(name, shape, params.scale, params.bias)
    layer.forward(x.astype(np.float64))
    expected_dx = layer.backward(dy.astype(np.float64))

    def loss(x, params):
        return jnp.sum(bnjax.layernorm_apply(params, x, axis=axis) * dy)

    dx, dparams = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)

    np.testing.assert_allclose(dx, expected_dx, **GRAD_TOL["float32"])
    np.testing.assert_allclose(dparams.scale, layer.gradients["scaler"], **GRAD_TOL["float32"])
    np.testing.assert_allclose(dparams.bias, layer.gradients["intercept"], **GRAD_TOL["float32"])


# --- Initial values -----------------------------------------------------------


@pytest.mark.parametrize("feature_shape", [5, (3, 4)], ids=["int", "tuple"])
def test_init_gives_unit_scale_and_zero_bias_of_feature_shape(feature_shape):
    params = bnjax.layernorm_init(feature_shape)

    shape = (feature_shape,) if isinstance(feature_shape, int) else feature_shape
    np.testing.assert_array_equal(params.scale, np.ones(shape))
    np.testing.assert_array_equal(params.bias, np.zeros(shape))
    assert params.scale.shape == shape and params.bias.shape == shape
    assert params.scale.dtype == jnp.float32 and params.bias.dtype == jnp.float32


@pytest.mark.parametrize(
    "use_scale, use_bias",
    [(False, True), (True, False), (False, False)],
    ids=["no-scale", "no-bias", "neither"],
)
def test_init_without_scale_or_bias_gives_none_fields(use_scale, use_bias):
    params = bnjax.layernorm_init((3, 4), use_scale=use_scale, use_bias=use_bias)

    assert (params.scale is None) == (not use_scale)
    assert (params.bias is None) == (not use_bias)


# --- Against float64 numpy ----------------------------------------------------


@pytest.mark.parametrize("shape", LAST_AXIS_CASES, ids=LAST_AXIS_IDS)
def test_output_over_last_axis_matches_float64_reference(shape):
    rng = np.random.default_rng(2)
    x = random_examples(rng, shape)
    params = random_params(rng, shape[-1])

    y = bnjax.layernorm_apply(params, jnp.asarray(x))

    assert y.dtype == jnp.float32
    expected = references.layernorm(x, params.scale, params.bias, axes=(-1,))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis", [((6, 5), -1), ((2, 3, 4, 5), (1, 3))], ids=["NC", "(1,3)"])
def test_float64_output_matches_float64_reference(x64, shape, axis):
    rng = np.random.default_rng(2)
    x = random_examples(rng, shape, np.float64)
    params = random_params(rng, _feature_shape(shape, axis))

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    assert y.dtype == jnp.float64
    expected = references.layernorm(x, params.scale, params.bias, axes=_axes(axis))
    np.testing.assert_allclose(y, expected, **TOL["float64"])


def test_epsilon_is_added_to_the_variance():
    rng = np.random.default_rng(13)
    shape, axis = (2, 3, 4, 5), (1, 3)
    # Spread ~0.01 (variance ~1e-4): epsilon = 1e-3 dominates the denominator.
    x = (random_examples(rng, shape) * 0.01).astype(np.float32)
    params = random_params(rng, _feature_shape(shape, axis))

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis, epsilon=1e-3)

    expected = references.layernorm(x, params.scale, params.bias, axes=axis, epsilon=1e-3)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis", AXES_CASES, ids=AXES_IDS)
def test_output_over_tuple_of_axes_matches_float64_reference(shape, axis):
    rng = np.random.default_rng(3)
    x = random_examples(rng, shape)
    params = random_params(rng, _feature_shape(shape, axis))

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    expected = references.layernorm(x, params.scale, params.bias, axes=axis)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("axis", [1, (1,)], ids=["int", "tuple"])
def test_output_over_axis_1_only_matches_float64_reference(axis):
    rng = np.random.default_rng(4)
    shape = (2, 6, 3, 4)  # NCHW, normalized over C at each position
    x = random_examples(rng, shape)
    params = random_params(rng, 6)

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    expected = references.layernorm(x, params.scale, params.bias, axes=(1,))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "use_scale, use_bias",
    [(False, True), (True, False), (False, False)],
    ids=["no-scale", "no-bias", "neither"],
)
@pytest.mark.parametrize("shape, axis", [((6, 5), -1), ((2, 3, 4, 5), (1, 3))], ids=["NC", "(1,3)"])
def test_output_without_scale_or_bias_matches_float64_reference(shape, axis, use_scale, use_bias):
    rng = np.random.default_rng(5)
    x = random_examples(rng, shape)
    feature_shape = _feature_shape(shape, axis)
    random = random_params(rng, feature_shape)
    params = bnjax.NormParams(
        random.scale if use_scale else None, random.bias if use_bias else None
    )

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    expected = references.layernorm(x, params.scale, params.bias, axes=_axes(axis))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis", [((3, 5), -1), ((3, 2, 4, 5), (1, 3))], ids=["NC", "(1,3)"])
def test_constant_example_gives_bias(shape, axis):
    rng = np.random.default_rng(6)
    params = random_params(rng, _feature_shape(shape, axis))
    levels = np.array([3.25, -1e4, 0.0]).reshape((3,) + (1,) * (len(shape) - 1))
    # Constant over the normalized axes, different along the others.
    other = [a for a in range(1, len(shape)) if a not in [b % len(shape) for b in _axes(axis)]]
    x = np.broadcast_to(levels, shape).copy()
    for a in other:
        x = x + np.arange(shape[a]).reshape([-1 if b == a else 1 for b in range(len(shape))])
    x = x.astype(np.float32)

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    expected = references.layernorm(np.zeros(shape), None, params.bias, axes=_axes(axis))
    np.testing.assert_array_equal(y, expected.astype(np.float32))


# --- Large mean: the variance must be numerically stable ----------------------


@pytest.mark.parametrize(
    "shape, axis", [((4, 512), -1), ((4, 8, 8, 8), (1, 2, 3))], ids=["NC", "NHWC"]
)
def test_large_mean_example_comes_out_with_unit_std(shape, axis):
    rng = np.random.default_rng(7)
    # Each example: mean 1e4 (plus a per-example offset), std exactly 1 in float64.
    z = rng.normal(size=(shape[0], int(np.prod(shape[1:]))))
    z = (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, keepdims=True)
    x = (z + 1e4 + np.arange(shape[0])[:, None]).reshape(shape).astype(np.float32)
    params = bnjax.layernorm_init(_feature_shape(shape, axis))

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=axis)

    y = np.asarray(y, np.float64).reshape(shape[0], -1)
    np.testing.assert_allclose(y.std(axis=1), 1.0, rtol=0, atol=LARGE_MEAN_TOL)
    np.testing.assert_allclose(y.mean(axis=1), 0.0, rtol=0, atol=LARGE_MEAN_TOL)


# --- dtypes -------------------------------------------------------------------

LOW_PRECISION = [jnp.bfloat16, jnp.float16]
LOW_PRECISION_IDS = ["bfloat16", "float16"]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_input_gives_output_of_input_dtype_and_float32_params(dtype):
    rng = np.random.default_rng(8)
    x = jnp.asarray(random_examples(rng, (4, 3, 5)), dtype)
    params = bnjax.layernorm_init(5)

    y = bnjax.layernorm_apply(params, x)

    assert y.dtype == dtype
    assert params.scale.dtype == jnp.float32 and params.bias.dtype == jnp.float32


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("shape, axis", [((6, 5), -1), ((2, 3, 4, 5), (1, 3))], ids=["NC", "(1,3)"])
def test_low_precision_output_matches_float64_reference_on_rounded_input(shape, axis, dtype):
    rng = np.random.default_rng(9)
    x = jnp.asarray(random_examples(rng, shape), dtype)
    params = random_params(rng, _feature_shape(shape, axis))

    y = bnjax.layernorm_apply(params, x, axis=axis)

    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    expected = references.layernorm(rounded, params.scale, params.bias, axes=_axes(axis))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_statistics_are_accumulated_in_float32(dtype):
    rng = np.random.default_rng(10)
    # 4096 entries per example with mean ~3: a bfloat16/float16 accumulator
    # would shift the mean by many output ulps. Scale 1 and bias 0 make the
    # output (x - mean) / std, so an error in the mean shows directly.
    shape = (2, 16, 16, 16)
    x = jnp.asarray(random_examples(rng, shape) + 3.0, dtype)
    params = bnjax.layernorm_init(shape[1:])

    y = bnjax.layernorm_apply(params, x, axis=(1, 2, 3))

    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    expected = references.layernorm(rounded, None, None, axes=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL[jnp.dtype(dtype).name])


def test_float16_input_around_300_does_not_overflow():
    rng = np.random.default_rng(11)
    # 4096 entries per example around 300: their sum (~1.2e6) and the sum of
    # squared deviations exceed float16's largest value, 65504.
    shape = (2, 16, 16, 16)
    x = jnp.asarray(300 + 30 * rng.normal(size=shape), jnp.float16)
    params = random_params(rng, shape[1:])

    y = bnjax.layernorm_apply(params, x, axis=(1, 2, 3))

    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    expected = references.layernorm(rounded, params.scale, params.bias, axes=(1, 2, 3))
    assert np.all(np.isfinite(np.asarray(y, np.float64)))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL["float16"])


def test_param_dtype_float64_gives_float64_params(x64):
    rng = np.random.default_rng(12)
    params = bnjax.layernorm_init((3, 5), param_dtype=jnp.float64)
    x = random_examples(rng, (2, 3, 4, 5), np.float64)

    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=(1, 3))

    assert params.scale.dtype == jnp.float64 and params.bias.dtype == jnp.float64
    assert y.dtype == jnp.float64
    expected = references.layernorm(x, None, None, axes=(1, 3))
    np.testing.assert_allclose(y, expected, **TOL["float64"])


def test_reverse_mode_reduces_each_row_five_times():
    # Three row sums for the statistics (the rough mean, its correction, the
    # variance) and two for dx (of g * scale, and of g * scale * (x - mean)).
    # The variance's derivative through the mean, -2 E[x - mean], is exactly
    # zero and takes none.
    x = jnp.ones((4, 16))
    g = jnp.arange(64.0).reshape(x.shape)
    params = bnjax.layernorm_init(16)

    def loss(x):
        return jnp.vdot(bnjax.layernorm_apply(params, x), g)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(x).jaxpr
    row_sums = [
        eqn
        for eqn in helpers.equations(jaxpr)
        if eqn.primitive.name == "reduce_sum"
        and eqn.invars[0].aval.shape == x.shape
        and eqn.params["axes"] == (1,)
    ]
    assert len(row_sums) == 5
