"""Composition with JAX's transformations: jit, vmap, grad, jvp, scan, eval_shape.

The same contract is checked for BatchNorm in both modes and for LayerNorm.
Values are compared with the eager call (jit, scan) or with a Python loop
(vmap), and derivatives with finite differences (`check_grads`).
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax
from bnjax._src import batchnorm, layernorm

# Compiled and eager float32 code may fuse differently: a few ulps of O(1)
# outputs. Float64 derivatives by central differences of step 1e-3 (the
# default of check_grads) agree to about 1e-5; check_grads' own default
# tolerance for float64 is 1e-5 too.
JIT_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)


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


def _random_params(init, shape, dtype, seed=0):
    """Non-trivial scale and bias, so their derivatives are exercised."""
    params = init(shape, dtype)
    keys = jax.random.split(jax.random.key(seed), 2)
    return bnjax.NormParams(
        scale=params.scale + 0.3 * jax.random.normal(keys[0], params.scale.shape, dtype),
        bias=params.bias + 0.3 * jax.random.normal(keys[1], params.bias.shape, dtype),
    )


def _input(shape, dtype=jnp.float32, seed=1):
    return 2.0 + 3.0 * jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_jit_equals_eager(name):
    apply, init = NORMALIZERS[name]
    params, x = _random_params(init, SHAPE, jnp.float32), _input(SHAPE)
    np.testing.assert_allclose(jax.jit(apply)(params, x), apply(params, x), **JIT_TOL)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_vmap_equals_python_loop(name):
    apply, init = NORMALIZERS[name]
    params, xs = _random_params(init, SHAPE, jnp.float32), _input((3, *SHAPE))
    mapped = jax.vmap(apply, in_axes=(None, 0))(params, xs)
    looped = jnp.stack([apply(params, x) for x in xs])
    np.testing.assert_allclose(mapped, looped, **JIT_TOL)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_derivatives_match_finite_differences_to_second_order(name, x64):
    apply, init = NORMALIZERS[name]
    params, x = _random_params(init, SHAPE, jnp.float64), _input(SHAPE, jnp.float64)
    # A fixed cotangent makes the output scalar without symmetries that could
    # hide errors (the plain sum of a normalized output has zero gradient).
    weights = jax.random.normal(jax.random.key(2), SHAPE, jnp.float64)

    def loss(params, x):
        return jnp.sum(jnp.tanh(apply(params, x)) * weights)

    check_grads(loss, (params, x), order=2, modes=("fwd", "rev"), **GRAD_TOL)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_jvp_equals_linearized_vjp(name):
    apply, init = NORMALIZERS[name]
    params, x = _random_params(init, SHAPE, jnp.float32), _input(SHAPE)
    tangent = jax.random.normal(jax.random.key(3), SHAPE)
    cotangent = jax.random.normal(jax.random.key(4), SHAPE)
    _, jvp_out = jax.jvp(lambda x: apply(params, x), (x,), (tangent,))
    _, vjp = jax.vjp(lambda x: apply(params, x), x)
    # <J t, c> == <t, J^T c>: forward and reverse mode describe one Jacobian.
    # Both sides sum 120 float32 products of O(1) terms: 1e-4 relative is ample.
    np.testing.assert_allclose(
        jnp.vdot(jvp_out, cotangent), jnp.vdot(tangent, vjp(cotangent)[0]), rtol=1e-4
    )


def test_batchnorm_init_under_eval_shape_allocates_nothing():
    params, state = jax.eval_shape(functools.partial(bnjax.batchnorm_init, 7))
    assert params.scale.shape == params.bias.shape == state.mean.shape == (7,)
    assert state.count.shape == () and state.count.dtype == jnp.int32


def test_layernorm_init_under_eval_shape_allocates_nothing():
    params = jax.eval_shape(functools.partial(bnjax.layernorm_init, (3, 4)))
    assert params.scale.shape == (3, 4) and params.scale.dtype == jnp.float32


def test_eval_mode_returns_the_state_unchanged():
    params, state = bnjax.batchnorm_init(4)
    _, new_state = bnjax.batchnorm_apply(params, state, _input((8, 4)), False)
    assert new_state is state


def test_running_state_threads_through_lax_scan():
    params, state = bnjax.batchnorm_init(4)
    batches = _input((5, 8, 4))

    def step(state, x):
        y, state = bnjax.batchnorm_apply(params, state, x, True)
        return state, y

    scanned_state, scanned_ys = jax.lax.scan(step, state, batches)
    looped_ys = []
    for x in batches:
        state, y = step(state, x)
        looped_ys.append(y)
    np.testing.assert_allclose(scanned_ys, jnp.stack(looped_ys), **JIT_TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **JIT_TOL), scanned_state, state)
    assert int(scanned_state.count) == 5


def test_train_and_eval_branches_under_lax_cond():
    params, state = bnjax.batchnorm_init(4)
    x = _input((8, 4))

    def run(is_training):
        return jax.lax.cond(
            is_training,
            lambda: bnjax.batchnorm_apply(params, state, x, True),
            lambda: bnjax.batchnorm_apply(params, state, x, False),
        )

    y_train, state_train = jax.jit(run)(True)
    y_eval, state_eval = jax.jit(run)(False)
    np.testing.assert_allclose(y_train, bnjax.batchnorm_apply(params, state, x, True)[0], **JIT_TOL)
    np.testing.assert_allclose(y_eval, bnjax.batchnorm_apply(params, state, x, False)[0], **JIT_TOL)
    assert int(state_train.count) == 1 and int(state_eval.count) == 0


def test_jitted_training_step_compiles_once_for_new_values():
    traces = []

    @functools.partial(jax.jit, static_argnames="train")
    def step(params, state, x, train):
        traces.append(train)
        return bnjax.batchnorm_apply(params, state, x, train)

    params, state = bnjax.batchnorm_init(4)
    for seed in range(3):
        _, state = step(params, state, _input((8, 4), seed=seed), train=True)
    step(params, state, _input((8, 4)), train=False)
    assert traces == [True, False]


@pytest.mark.parametrize("module", [batchnorm, layernorm], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    globs = {"bnjax": bnjax, "jnp": jnp, "jax": jax}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
