"""Forward and reverse mode agree, and every docstring example runs.

The transformation contract for every normalizer (jit, vmap, check_grads,
scan, cond, eval_shape, retracing) lives in `test_factories.py`.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax._src import (
    batchnorm,
    batchrenorm,
    factories,
    folding,
    groupnorm,
    layernorm,
    precise,
    rmsnorm,
    spectralnorm,
    weight_decay,
    weight_factories,
    weight_standardization,
    weightnorm,
)
from bnjax._src.adapters import equinox as adapter_equinox
from bnjax._src.adapters import nnx as adapter_nnx
from bnjax._src.convert import flax_linen, haiku, keras, pytorch, pytorch_parametrizations
from tests.helpers import perturbed_params


def _batchnorm_train(params, x):
    state = bnjax.batchnorm_init(x.shape[-1], param_dtype=x.dtype)[1]
    return bnjax.batchnorm_apply(params, state, x, True)[0]


def _batchnorm_eval(params, x):
    c = x.shape[-1]
    state = bnjax.BatchStats(jnp.linspace(-1, 1, c), jnp.linspace(0.5, 2, c), jnp.int32(3))
    return bnjax.batchnorm_apply(params, state, x, False)[0]


def _layernorm(params, x):
    return bnjax.layernorm_apply(params, x, axis=(-2, -1))


def _layernorm_params(shape, dtype):
    return bnjax.layernorm_init(shape[-2:], param_dtype=dtype)


def _batchnorm_params(shape, dtype):
    return bnjax.batchnorm_init(shape[-1], param_dtype=dtype)[0]


NORMALIZERS = {
    "batchnorm-train": (_batchnorm_train, _batchnorm_params),
    "batchnorm-eval": (_batchnorm_eval, _batchnorm_params),
    "layernorm": (_layernorm, _layernorm_params),
}
SHAPE = (6, 5, 4)


def _input(shape, dtype=jnp.float32, seed=1):
    return 2.0 + 3.0 * jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_jvp_equals_linearized_vjp(name):
    apply, init = NORMALIZERS[name]
    params, x = perturbed_params(init(SHAPE, jnp.float32)), _input(SHAPE)
    tangent = jax.random.normal(jax.random.key(3), SHAPE)
    cotangent = jax.random.normal(jax.random.key(4), SHAPE)
    _, jvp_out = jax.jvp(lambda x: apply(params, x), (x,), (tangent,))
    _, vjp = jax.vjp(lambda x: apply(params, x), x)
    # <J t, c> == <t, J^T c>: forward and reverse mode describe one Jacobian.
    # Both sides sum 120 float32 products of O(1) terms: 1e-4 relative is ample.
    np.testing.assert_allclose(
        jnp.vdot(jvp_out, cotangent), jnp.vdot(tangent, vjp(cotangent)[0]), rtol=1e-4
    )


@pytest.mark.parametrize(
    "module",
    [
        adapter_equinox,
        adapter_nnx,
        batchnorm,
        batchrenorm,
        factories,
        flax_linen,
        folding,
        groupnorm,
        haiku,
        keras,
        layernorm,
        precise,
        pytorch,
        pytorch_parametrizations,
        rmsnorm,
        spectralnorm,
        weight_decay,
        weight_factories,
        weight_standardization,
        weightnorm,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples_run(module):
    globs = {"bnjax": bnjax, "jnp": jnp, "jax": jax, "np": np}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
