"""Folding eval-mode BatchNorm into Dense and Conv layers.

The folded layer runs in float32 and is compared with the unfolded layer
followed by eval-mode BatchNorm, both in float64 numpy (`references`), and the
folded weights with PyTorch's own fusion (`torch.nn.utils.fusion`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from torch.nn.utils import fusion

import bnjax
from tests import references

EPSILON = 1e-3
# Folded float32 layer against the float64 unfolded layer + BatchNorm. Each
# output is a float32 sum of at most 3*3*3*4 = 108 products (plus the bias)
# whose absolute values add up to at most ~30 here; the fold itself adds one
# rounding (2^-24 relative) per kernel entry. Rounding errors of such a sum
# grow like sqrt(n) u sum|terms| ~ 10 * 6e-8 * 30 ~ 2e-5 in the worst
# realistic case (observed: <= 1.4e-6), so atol 5e-5 with rtol 1e-5. A fold
# that is wrong by one term (e.g. the mean not scaled) is off by O(1).
FOLD_TOL = {"rtol": 1e-5, "atol": 5e-5}
# The same comparison with everything in float64: only roundings, ~1e-15.
FOLD_TOL_64 = {"rtol": 1e-12, "atol": 1e-12}
# bnjax's folded weights against PyTorch's fusion, both float32 from the same
# float32 inputs: a handful of roundings each, so a few ulps.
TORCH_TOL = {"rtol": 1e-6, "atol": 1e-6}


def _batchnorm(rng, c, *, affine=True, dtype=np.float32):
    """Non-trivial eval-mode BatchNorm: scale of both signs, var away from 1."""
    scale = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c) if affine else None
    bias = rng.normal(size=c) if affine else None
    params = bnjax.NormParams(
        None if scale is None else jnp.asarray(scale, dtype),
        None if bias is None else jnp.asarray(bias, dtype),
    )
    state = bnjax.BatchStats(
        jnp.asarray(rng.normal(size=c), dtype),
        jnp.asarray(rng.uniform(0.2, 3.0, c), dtype),
        jnp.int32(5),
    )
    return params, state


def _bn_reference(z, params, state):
    return references.batchnorm_eval(
        z, params.scale, params.bias, state.mean, state.var, epsilon=EPSILON
    )


def _conv_reference(x, kernel, bias):
    y = references.conv(x, kernel)
    return y if bias is None else y + np.asarray(bias, np.float64)


def _conv(x, kernel, bias):
    """The layer under test: `lax.conv_general_dilated`, channels last, SAME."""
    d = kernel.ndim - 2
    spatial = "DHW"[-d:]
    numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    y = lax.conv_general_dilated(
        x,
        kernel,
        (1,) * d,
        "SAME",
        dimension_numbers=numbers,
        precision=lax.Precision.HIGHEST,
    )
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def _dense(x, kernel, bias):
    return jnp.dot(x, kernel, precision=lax.Precision.HIGHEST) + bias[None]


def _dense_reference(x, kernel, bias):
    y = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


# (layer, reference, input shape, kernel shape)
LAYERS = {
    "dense": (_dense, _dense_reference, (7, 5), (5, 4)),
    "conv1d": (_conv, _conv_reference, (2, 9, 3), (3, 3, 4)),
    "conv2d": (_conv, _conv_reference, (2, 6, 5, 3), (3, 2, 3, 4)),
    "conv3d": (_conv, _conv_reference, (2, 4, 5, 3, 4), (3, 3, 3, 4, 4)),
}


def _layer_inputs(rng, name, with_bias, dtype=np.float32):
    _, _, x_shape, k_shape = LAYERS[name]
    x = jnp.asarray(rng.normal(size=x_shape) + 0.5, dtype)
    kernel = jnp.asarray(rng.normal(size=k_shape) / np.sqrt(np.prod(k_shape[:-1])), dtype)
    bias = jnp.asarray(rng.normal(size=k_shape[-1]), dtype) if with_bias else None
    return x, kernel, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name", LAYERS)
def test_folded_layer_equals_layer_then_eval_batchnorm(name, with_bias):
    layer, reference, _, _ = LAYERS[name]
    rng = np.random.default_rng(0)
    x, kernel, bias = _layer_inputs(rng, name, with_bias)
    params, state = _batchnorm(rng, kernel.shape[-1])

    folded_kernel, folded_bias = bnjax.fold_batchnorm_after(
        kernel, bias, params, state, epsilon=EPSILON
    )

    expected = _bn_reference(reference(x, kernel, bias), params, state)
    np.testing.assert_allclose(layer(x, folded_kernel, folded_bias), expected, **FOLD_TOL)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name", LAYERS)
def test_folding_is_exact_in_float64(x64, name, with_bias):
    layer, reference, _, _ = LAYERS[name]
    rng = np.random.default_rng(1)
    x, kernel, bias = _layer_inputs(rng, name, with_bias, np.float64)
    params, state = _batchnorm(rng, kernel.shape[-1], dtype=np.float64)

    folded_kernel, folded_bias = bnjax.fold_batchnorm_after(
        kernel, bias, params, state, epsilon=EPSILON
    )

    assert folded_kernel.dtype == folded_bias.dtype == jnp.float64
    expected = _bn_reference(reference(x, kernel, bias), params, state)
    np.testing.assert_allclose(layer(x, folded_kernel, folded_bias), expected, **FOLD_TOL_64)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_folding_without_batchnorm_scale_and_bias_uses_identity_affine(affine):
    rng = np.random.default_rng(2)
    x, kernel, bias = _layer_inputs(rng, "dense", True)
    params, state = _batchnorm(rng, 4, affine=affine)

    folded = bnjax.fold_batchnorm_after(kernel, bias, params, state, epsilon=EPSILON)

    expected = _bn_reference(_dense_reference(x, kernel, bias), params, state)
    np.testing.assert_allclose(_dense(x, *folded), expected, **FOLD_TOL)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_folding_batchnorm_before_dense_equals_batchnorm_then_dense(with_bias):
    rng = np.random.default_rng(3)
    x, kernel, bias = _layer_inputs(rng, "dense", with_bias)
    params, state = _batchnorm(rng, kernel.shape[0])

    folded_kernel, folded_bias = bnjax.fold_batchnorm_before_dense(
        kernel, bias, params, state, epsilon=EPSILON
    )

    expected = _dense_reference(_bn_reference(x, params, state), kernel, bias)
    np.testing.assert_allclose(_dense(x, folded_kernel, folded_bias), expected, **FOLD_TOL)


# PyTorch's fusion helpers take output channels first: OIHW for a conv, (out, in)
# for a linear layer. Each case: layer, helper name, bnjax -> torch layout.
TORCH_FUSIONS = {
    "conv2d": ("fuse_conv_bn_weights", (3, 2, 0, 1)),  # HWIO -> OIHW
    "dense": ("fuse_linear_bn_weights", (1, 0)),  # (in, out) -> (out, in)
}


@pytest.mark.parametrize("layer", list(TORCH_FUSIONS))
def test_folded_weights_match_pytorch_fusion(layer):

    helper, to_torch = TORCH_FUSIONS[layer]
    rng = np.random.default_rng(4)
    _, kernel, bias = _layer_inputs(rng, layer, True)
    params, state = _batchnorm(rng, kernel.shape[-1])

    folded_kernel, folded_bias = bnjax.fold_batchnorm_after(
        kernel, bias, params, state, epsilon=EPSILON
    )

    def t(a):
        return torch.from_numpy(np.array(a))

    torch_kernel, torch_bias = getattr(fusion, helper)(
        t(np.transpose(kernel, to_torch)),
        t(bias),
        t(state.mean),
        t(state.var),
        EPSILON,
        t(params.scale),
        t(params.bias),
    )
    expected_kernel = np.transpose(torch_kernel.detach().numpy(), np.argsort(to_torch))
    np.testing.assert_allclose(folded_kernel, expected_kernel, **TORCH_TOL)
    np.testing.assert_allclose(folded_bias, torch_bias.detach().numpy(), **TORCH_TOL)


def test_folding_keeps_kernel_dtype_and_runs_under_jit():
    rng = np.random.default_rng(6)
    _, kernel, _ = _layer_inputs(rng, "conv2d", False)
    params, state = _batchnorm(rng, kernel.shape[-1])

    folded_kernel, folded_bias = jax.jit(bnjax.fold_batchnorm_after)(
        kernel.astype(jnp.bfloat16), None, params, state
    )

    assert folded_kernel.dtype == folded_bias.dtype == jnp.bfloat16
    assert folded_kernel.shape == kernel.shape and folded_bias.shape == (kernel.shape[-1],)


@pytest.mark.parametrize(
    "fold, kernel_shape",
    [(bnjax.fold_batchnorm_after, (5, 3)), (bnjax.fold_batchnorm_before_dense, (3, 5))],
    ids=["after", "before-dense"],
)
def test_folding_rejects_a_batchnorm_of_another_size(fold, kernel_shape):
    params, state = bnjax.batchnorm_init(4)
    with pytest.raises(ValueError, match="must have shape \\(4,\\)|must have shape \\(3,\\)"):
        fold(jnp.ones(kernel_shape), None, params, state)
