"""Conditioning and scale conventions: `modulation`, `zero_centered_scale`, `dtype`, warm-up.

SPEC, "Conditioning and scale conventions". Expected values come from the
float64 formulas in `references` and from PyTorch autograd, never from
bnjax itself.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnjax
from tests import references
from tests.helpers import f64, random_examples, random_params
from tests.tolerances import BF16_ROUNDED_ONCE_MISMATCHES, TOL


class Case(NamedTuple):
    """One normalizer in one layout, called as `apply(params, state, x, **keywords) -> y`."""

    x_shape: tuple[int, ...]
    modulation_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    apply: Callable[..., jax.Array]
    # reference(x, scale, bias, state) -> the float64 output before modulation
    reference: Callable[..., np.ndarray]
    has_bias: bool = True
    stateful: bool = False


def _batchnorm(train, **hyper):
    def apply(params, state, x, **keywords):
        return bnjax.batchnorm_apply(params, state, x, train, **hyper, **keywords)[0]

    return apply


def _batchnorm_reference(train, axis=-1):
    def reference(x, scale, bias, state):
        if train:
            return references.batchnorm(x, scale, bias, axis=axis)[0]
        return references.batchnorm_eval(x, scale, bias, state.mean, state.var, axis=axis)

    return reference


def _batchrenorm(params, state, x, **keywords):
    return bnjax.batchrenorm_apply(params, state, x, True, **keywords)[0]


def _batchrenorm_reference(x, scale, bias, state):
    return references.batchrenorm(x, scale, bias, state.mean, state.var)[0]


CASES = {
    "layernorm-tokens": Case(
        (4, 6, 8),
        (4, 1, 8),
        (8,),
        lambda p, s, x, **k: bnjax.layernorm_apply(p, x, **k),
        lambda x, scale, bias, s: references.layernorm(x, scale, bias),
    ),
    "layernorm-image": Case(
        (3, 4, 4, 5),
        (3, 1, 1, 5),
        (4, 4, 5),
        lambda p, s, x, **k: bnjax.layernorm_apply(p, x, axis=(1, 2, 3), **k),
        lambda x, scale, bias, s: references.layernorm(x, scale, bias, axes=(1, 2, 3)),
    ),
    "rmsnorm-tokens": Case(
        (4, 6, 8),
        (4, 1, 8),
        (8,),
        lambda p, s, x, **k: bnjax.rmsnorm_apply(p, x, **k),
        lambda x, scale, bias, s: references.rmsnorm(x, scale),
        has_bias=False,
    ),
    "batchnorm-train-tokens": Case(
        (4, 6, 8), (4, 1, 8), (8,), _batchnorm(True), _batchnorm_reference(True), stateful=True
    ),
    "batchnorm-train-NHWC": Case(
        (4, 3, 3, 8),
        (4, 1, 1, 8),
        (8,),
        _batchnorm(True),
        _batchnorm_reference(True),
        stateful=True,
    ),
    "batchnorm-train-NCHW": Case(
        (4, 8, 3, 3),
        (4, 8, 1, 1),
        (8,),
        _batchnorm(True, axis=1),
        _batchnorm_reference(True, axis=1),
        stateful=True,
    ),
    "batchnorm-ghost-NHWC": Case(
        (4, 3, 3, 8),
        (4, 1, 1, 8),
        (8,),
        _batchnorm(True, virtual_batch_size=2),
        lambda x, scale, bias, s: references.ghost_batchnorm(x, scale, bias, virtual_batch_size=2)[
            0
        ],
        stateful=True,
    ),
    "batchnorm-eval-NHWC": Case(
        (4, 3, 3, 8),
        (4, 1, 1, 8),
        (8,),
        _batchnorm(False),
        _batchnorm_reference(False),
        stateful=True,
    ),
    "batchrenorm-train-NHWC": Case(
        (4, 3, 3, 8), (4, 1, 1, 8), (8,), _batchrenorm, _batchrenorm_reference, stateful=True
    ),
    "groupnorm-NHWC": Case(
        (4, 3, 3, 8),
        (4, 1, 1, 8),
        (8,),
        lambda p, s, x, **k: bnjax.groupnorm_apply(p, x, num_groups=2, **k),
        lambda x, scale, bias, s: references.groupnorm(x, scale, bias, num_groups=2),
    ),
    "groupnorm-NCHW": Case(
        (4, 8, 3, 3),
        (4, 8, 1, 1),
        (8,),
        lambda p, s, x, **k: bnjax.groupnorm_apply(p, x, num_groups=4, axis=1, **k),
        lambda x, scale, bias, s: references.groupnorm(x, scale, bias, num_groups=4, axis=1),
    ),
    "instancenorm-NHWC": Case(
        (4, 3, 3, 8),
        (4, 1, 1, 8),
        (8,),
        lambda p, s, x, **k: bnjax.instancenorm_apply(p, x, **k),
        lambda x, scale, bias, s: references.instancenorm(x, scale, bias),
    ),
}
NAMES = list(CASES)


def _inputs(case: Case, dtype: Any = np.float32, seed: int = 0):
    """x, params, running state, and a modulation of the case's shapes (float32)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(random_examples(rng, case.x_shape, dtype))
    params = random_params(rng, case.param_shape)
    if not case.has_bias:
        params = params._replace(bias=None)
    c = case.param_shape[-1]
    state = bnjax.BatchStats(
        jnp.asarray(rng.normal(size=c), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        jnp.int32(3),
    )
    modulation = (
        jnp.asarray(0.5 * rng.normal(size=case.modulation_shape), jnp.float32),
        jnp.asarray(rng.normal(size=case.modulation_shape), jnp.float32),
    )
    return x, params, state, modulation


def _expected(case, x, params, state, modulation, scale=None):
    """The float64 reference: the normalizer with `scale` (default `params.scale`), modulated."""
    scale = params.scale if scale is None else scale
    y = case.reference(f64(x), f64(scale), f64(params.bias), state)
    return references.modulate(y, *(f64(m) for m in modulation))


def _call(case, params, state, x, **keywords):
    return jax.jit(lambda: case.apply(params, state, x, **keywords))()


# ---------------------------------------------------------------------------
# modulation=(scale, shift)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("parts", ["both", "scale", "shift"])
def test_modulation_follows_the_learned_affine_as_one_plus_scale_and_shift(name, parts):
    case = CASES[name]
    x, params, state, (scale, shift) = _inputs(case)
    modulation = {"both": (scale, shift), "scale": (scale, None), "shift": (None, shift)}[parts]
    y = _call(case, params, state, x, modulation=modulation)
    expected = _expected(case, x, params, state, modulation)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("name", NAMES)
def test_modulation_of_a_bfloat16_input_is_rounded_once(name):
    # float32 statistics and arithmetic err by ~1e-6 relative; the output is
    # then rounded once to bfloat16, so it equals the float64 result rounded
    # once except where the two straddle a rounding boundary, and then by
    # one ulp (see BF16_ROUNDED_ONCE_MISMATCHES). Rounding the normalized
    # output to bfloat16 before modulating misses on ~25% of the entries.
    case = CASES[name]
    # 64 examples: thousands of outputs, so the share of misses means something.
    case = case._replace(
        x_shape=(64, *case.x_shape[1:]), modulation_shape=(64, *case.modulation_shape[1:])
    )
    x, params, state, modulation = _inputs(case, ml_dtypes.bfloat16)
    y = np.asarray(_call(case, params, state, x, modulation=modulation), np.float64)
    expected = _expected(case, x, params, state, modulation)
    rounded = expected.astype(ml_dtypes.bfloat16).astype(np.float64)
    missed = y != rounded
    assert missed.mean() <= BF16_ROUNDED_ONCE_MISMATCHES
    # A miss is the neighbour of the correctly rounded value: within one ulp,
    # at most 2^-7 relative for bfloat16's 8 significant bits.
    np.testing.assert_array_less(np.abs(y - rounded), 2.0**-7 * np.abs(rounded) + 1e-30)


@pytest.mark.parametrize("name", ["batchnorm-train-NHWC", "batchrenorm-train-NHWC"])
def test_modulation_leaves_the_running_statistics_as_without_it(name):
    case = CASES[name]
    x, params, state, modulation = _inputs(case)
    fn = bnjax.batchnorm_apply if name.startswith("batchnorm") else bnjax.batchrenorm_apply
    _, plain = jax.jit(lambda: fn(params, state, x, True))()
    _, modulated = jax.jit(lambda: fn(params, state, x, True, modulation=modulation))()
    jax.tree.map(np.testing.assert_array_equal, modulated, plain)


# Gradients: PyTorch autograd in float64 on `norm(x) * (1 + scale) + shift`.
TORCH_CASES = {
    "layernorm": (
        (3, 5, 6),
        (3, 1, 6),
        lambda p, x, m: bnjax.layernorm_apply(p, x, modulation=m),
        lambda x, w, b: F.layer_norm(x, (6,), w, b, eps=1e-5),
    ),
    "rmsnorm": (
        (3, 5, 6),
        (3, 1, 6),
        lambda p, x, m: bnjax.rmsnorm_apply(p._replace(bias=None), x, modulation=m),
        lambda x, w, b: F.rms_norm(x, (6,), w, eps=1e-6),
    ),
    "groupnorm-NCHW": (
        (3, 6, 2, 4),
        (3, 6, 1, 1),
        lambda p, x, m: bnjax.groupnorm_apply(p, x, num_groups=3, axis=1, modulation=m),
        lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-5),
    ),
    "instancenorm-NCHW": (
        (3, 6, 2, 4),
        (3, 6, 1, 1),
        lambda p, x, m: bnjax.instancenorm_apply(p, x, axis=1, modulation=m),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-5),
    ),
    "batchnorm-train-NCHW": (
        (3, 6, 2, 4),
        (3, 6, 1, 1),
        lambda p, x, m: bnjax.batchnorm_apply(
            p, bnjax.batchnorm_init(6, param_dtype=jnp.float64)[1], x, True, axis=1, modulation=m
        )[0],
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5),
    ),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_gradients_reach_x_params_and_modulation_as_in_torch_autograd(x64, name):
    x_shape, modulation_shape, ours, theirs = TORCH_CASES[name]
    rng = np.random.default_rng(1)
    x = random_examples(rng, x_shape, np.float64)
    params = random_params(rng, (6,), np.float64)
    scale = 0.5 * rng.normal(size=modulation_shape)
    shift = rng.normal(size=modulation_shape)
    cotangent = rng.normal(size=x_shape)

    def loss(x, params, scale, shift):
        return jnp.sum(ours(params, x, (scale, shift)) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, params, scale, shift)

    tensors = [torch.tensor(a, requires_grad=True) for a in (x, *params, scale, shift)]
    tx, tw, tb, ts, tt = tensors
    y = theirs(tx, tw, None if name == "rmsnorm" else tb) * (1 + ts) + tt
    (y * torch.tensor(cotangent)).sum().backward()

    grad_x, grad_params, grad_scale, grad_shift = grads
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), **TOL["float64"])
    np.testing.assert_allclose(grad_params.scale, tw.grad.numpy(), **TOL["float64"])
    if name != "rmsnorm":
        np.testing.assert_allclose(grad_params.bias, tb.grad.numpy(), **TOL["float64"])
    np.testing.assert_allclose(grad_scale, ts.grad.numpy(), **TOL["float64"])
    np.testing.assert_allclose(grad_shift, tt.grad.numpy(), **TOL["float64"])


# Every factory's `apply` takes `modulation=` and passes it on.
FACTORIES = {
    "batchnorm": (bnjax.batchnorm, "batchnorm-train-NHWC"),
    "batchrenorm": (bnjax.batchrenorm, "batchrenorm-train-NHWC"),
    "layernorm": (bnjax.layernorm, "layernorm-tokens"),
    "rmsnorm": (bnjax.rmsnorm, "rmsnorm-tokens"),
    "groupnorm": (lambda **k: bnjax.groupnorm(num_groups=2, **k), "groupnorm-NHWC"),
    "instancenorm": (bnjax.instancenorm, "instancenorm-NHWC"),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_normalizer_apply_takes_a_modulation(name):
    factory, case_name = FACTORIES[name]
    case = CASES[case_name]
    x, params, state, modulation = _inputs(case)
    norm = factory()
    _, init_state = norm.init(case.x_shape)
    state = None if init_state is None else state
    y, _ = jax.jit(lambda: norm.apply(params, state, x, True, modulation=modulation))()
    np.testing.assert_allclose(y, _expected(case, x, params, state, modulation), **TOL["float32"])


BAD_MODULATIONS = {
    "lower-rank": ((4, 8), None, ValueError, r"rank 3.*\(4, 8\).*reshape\(4, 1, 8\)"),
    "wrong-size": ((4, 1, 7), None, ValueError, r"each axis 1 or `x`'s size"),
    "larger": (None, (4, 2, 6, 8), ValueError, r"`modulation\[1\]` \(shift\)"),
    "integer": ("int", None, TypeError, r"`modulation\[0\]` must have a floating dtype"),
}


@pytest.mark.parametrize("bad", list(BAD_MODULATIONS))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_modulation_that_does_not_fit_raises_naming_it(name, bad):
    factory, case_name = FACTORIES[name]
    norm = factory()
    x = jnp.ones((4, 6, 8))
    params, state = norm.init(x.shape)
    scale_shape, shift_shape, error, match = BAD_MODULATIONS[bad]
    scale = jnp.ones((4, 1, 8), jnp.int32) if scale_shape == "int" else None
    scale = jnp.ones(scale_shape) if isinstance(scale_shape, tuple) else scale
    shift = None if shift_shape is None else jnp.ones(shift_shape)
    with pytest.raises(error, match=match):
        norm.apply(params, state, x, True, modulation=(scale, shift))


def test_a_modulation_that_is_not_a_pair_raises_type_error():
    params = bnjax.layernorm_init(8)
    with pytest.raises(TypeError, match=r"pair `\(scale, shift\)`.*length 3"):
        bnjax.layernorm_apply(params, jnp.ones((2, 8)), modulation=(None, None, None))
    with pytest.raises(TypeError, match="pair"):
        bnjax.layernorm_apply(params, jnp.ones((2, 8)), modulation=jnp.ones((2, 8)))


# ---------------------------------------------------------------------------
# zero_centered_scale: g stored, 1 + g applied


@pytest.mark.parametrize("name", NAMES)
def test_zero_centered_scale_applies_one_plus_g(name):
    case = CASES[name]
    x, params, state, modulation = _inputs(case)
    g = params.scale - 1.3  # both signs, away from 0
    y = _call(case, params._replace(scale=g), state, x, zero_centered_scale=True)
    expected = _expected(case, x, params, state, (None, None), scale=1 + f64(g))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


def test_zero_centered_rmsnorm_is_gemmas_formula():
    rng = np.random.default_rng(2)
    x = random_examples(rng, (4, 7, 16))
    g = 0.1 * rng.normal(size=16).astype(np.float32)
    y = bnjax.rmsnorm_apply(bnjax.NormParams(jnp.asarray(g), None), x, zero_centered_scale=True)
    np.testing.assert_allclose(y, references.gemma_rmsnorm(x, g), **TOL["float32"])


def test_zero_centered_layernorm_is_transformer_engines_zero_centered_gamma():
    # TE: (x - mean) / sqrt(var + eps) * (1 + gamma) + beta, gamma stored around 0.
    rng = np.random.default_rng(3)
    x = random_examples(rng, (4, 7, 16))
    gamma, beta = 0.1 * rng.normal(size=16), rng.normal(size=16)
    params = bnjax.NormParams(jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32))
    y = bnjax.layernorm_apply(params, x, zero_centered_scale=True)
    expected = references.layernorm(x, 1 + gamma.astype(np.float32), beta.astype(np.float32))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


def test_one_plus_g_is_computed_in_the_statistics_dtype_not_the_params_dtype():
    # g = 2^-10 is a bfloat16 number, 1 + g is not (bfloat16 has 8 bits of
    # precision): added in bfloat16 it would be 1, and the output off by
    # ~1e-3 relative, 100 times TOL["float32"].
    x = random_examples(np.random.default_rng(4), (4, 16))
    g = jnp.full((16,), 2.0**-10, jnp.bfloat16)
    y = bnjax.rmsnorm_apply(bnjax.NormParams(g, None), x, zero_centered_scale=True)
    expected = references.rmsnorm(x, np.full(16, 1 + 2.0**-10))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


INITS = {
    "batchnorm_init": lambda **k: bnjax.batchnorm_init(5, **k)[0],
    "layernorm_init": lambda **k: bnjax.layernorm_init((2, 5), **k),
    "rmsnorm_init": lambda **k: bnjax.rmsnorm_init(5, **k),
    "groupnorm_init": lambda **k: bnjax.groupnorm_init(5, **k),
}


@pytest.mark.parametrize("name", list(INITS))
def test_zero_centered_init_stores_a_zero_scale_and_the_usual_bias(name):
    params = INITS[name](zero_centered_scale=True, param_dtype=jnp.bfloat16)
    assert params.scale.dtype == jnp.bfloat16
    np.testing.assert_array_equal(params.scale, 0)
    if params.bias is not None:
        np.testing.assert_array_equal(params.bias, 0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_factory_binds_zero_centered_scale_into_init_and_apply_alike(name):
    factory, case_name = FACTORIES[name]
    case = CASES[case_name]
    x = _inputs(case)[0]
    norm = factory(zero_centered_scale=True)
    params, state = norm.init(case.x_shape)
    np.testing.assert_array_equal(params.scale, 0)
    trained = params._replace(scale=params.scale + 0.25)
    y, _ = jax.jit(lambda: norm.apply(trained, state, x, True))()
    expected = case.reference(f64(x), np.full(case.param_shape, 1.25), f64(params.bias), state)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


def test_folding_a_zero_centered_batchnorm_applies_one_plus_g():
    rng = np.random.default_rng(5)
    kernel, bias = rng.normal(size=(3, 4)), rng.normal(size=4)
    g, beta = 0.2 * rng.normal(size=4), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    params = bnjax.NormParams(jnp.asarray(g, jnp.float32), jnp.asarray(beta, jnp.float32))
    state = bnjax.BatchStats(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), 0)
    folded_kernel, folded_bias = bnjax.fold_batchnorm_after(
        jnp.asarray(kernel, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        params,
        state,
        zero_centered_scale=True,
    )
    inputs = rng.normal(size=(6, 3))
    expected = references.batchnorm_eval(inputs @ kernel + bias, 1 + g, beta, mean, var)
    folded = inputs @ np.asarray(folded_kernel, np.float64) + np.asarray(folded_bias, np.float64)
    np.testing.assert_allclose(folded, expected, **TOL["float32"])


# ---------------------------------------------------------------------------
# dtype=: the output dtype


@pytest.mark.parametrize("name", NAMES)
def test_float32_output_of_a_bfloat16_input_is_not_rounded_to_bfloat16(name):
    # TOL["float32"] is ~100 times finer than a bfloat16 ulp.
    case = CASES[name]
    x, params, state, modulation = _inputs(case, ml_dtypes.bfloat16)
    y = _call(case, params, state, x, modulation=modulation, dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, _expected(case, x, params, state, modulation), **TOL["float32"])


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_output_of_a_float32_input_is_the_result_rounded(name):
    case = CASES[name]
    x, params, state, modulation = _inputs(case)
    y = _call(case, params, state, x, modulation=modulation, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    expected = _expected(case, x, params, state, modulation)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL["bfloat16"])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_factory_binds_the_output_dtype(name):
    factory, case_name = FACTORIES[name]
    case = CASES[case_name]
    norm = factory(dtype=jnp.bfloat16)
    params, state = norm.init(case.x_shape)
    x = _inputs(case)[0]
    y, _ = jax.jit(lambda: norm.apply(params, state, x, True))()
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.int32, bool, "not a dtype"], ids=["int32", "bool", "str"])
def test_a_dtype_that_is_not_floating_raises_type_error(dtype):
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        bnjax.layernorm_apply(bnjax.layernorm_init(4), jnp.ones((2, 4)), dtype=dtype)
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        bnjax.batchnorm(dtype=dtype)


# ---------------------------------------------------------------------------
# momentum_warmup


def _batches(num, seed=6):
    """Batches `(16, 3)` whose means and spreads drift far from the initial (0, 1)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(16, 3)) * (3 + k) + 20 + 2 * k).astype(np.float32) for k in range(num)
    ]


@pytest.mark.parametrize("momentum", [0.9, 0.7, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("fn", [bnjax.batchnorm_apply, bnjax.batchrenorm_apply], ids=["bn", "brn"])
def test_warmup_follows_the_cumulative_average_then_the_moving_average(fn, momentum):
    # 0.9 warms up for 10 updates, 0.7 for 4 (1 / 0.3 = 3.33), 0.5 for 2,
    # 0.0 for 1 (the same as the moving average), 1.0 for ever.
    batches = _batches(14)
    stats = [references.batchnorm(x, None, None)[1:] for x in batches]
    expected = references.running_stats_with_warmup(*zip(*stats, strict=True), momentum)
    params, state = bnjax.batchnorm_init(3)
    step = jax.jit(lambda s, x: fn(params, s, x, True, momentum=momentum, momentum_warmup=True)[1])
    for k, (x, (mean, var)) in enumerate(zip(batches, expected, strict=True)):
        state = step(state, x)
        assert int(state.count) == k + 1
        np.testing.assert_allclose(state.mean, mean, **TOL["float32"])
        np.testing.assert_allclose(state.var, var, **TOL["float32"])


def test_after_the_warmup_every_batch_has_counted_equally():
    # The closed form after 1 / (1 - momentum) = 10 updates: the plain mean
    # of the batch statistics. Without warm-up the initial (0, 1) still has
    # weight 0.9^10 = 0.35.
    batches = _batches(10)
    params, state = bnjax.batchnorm_init(3)
    step = jax.jit(lambda s, x: bnjax.batchnorm_apply(params, s, x, True, momentum_warmup=True))
    for x in batches:
        _, state = step(state, x)
    means, variances = zip(*(references.batchnorm(x, None, None)[1:] for x in batches), strict=True)
    np.testing.assert_allclose(state.mean, np.mean(means, axis=0), **TOL["float32"])
    np.testing.assert_allclose(state.var, np.mean(variances, axis=0), **TOL["float32"])


def test_warmup_has_no_effect_on_the_cumulative_average():
    params, state = bnjax.batchnorm_init(3)
    with_warmup = without = state
    for x in _batches(4):
        _, with_warmup = bnjax.batchnorm_apply(
            params, with_warmup, x, True, momentum=None, momentum_warmup=True
        )
        _, without = bnjax.batchnorm_apply(params, without, x, True, momentum=None)
    jax.tree.map(np.testing.assert_array_equal, with_warmup, without)


def test_a_skipped_batch_does_not_advance_the_warmup():
    params, state = bnjax.batchnorm_init(3)
    x = _batches(1)[0]
    _, state = bnjax.batchnorm_apply(params, state, x, True, momentum_warmup=True)
    _, skipped = bnjax.batchnorm_apply(
        params, state, x, True, momentum_warmup=True, mask=jnp.zeros(16, bool)
    )
    jax.tree.map(np.testing.assert_array_equal, skipped, state)


def test_warmup_with_a_traced_momentum_raises_type_error():
    params, state = bnjax.batchnorm_init(3)
    x = jnp.ones((4, 3))

    @jax.jit
    def step(momentum):
        return bnjax.batchnorm_apply(
            params, state, x, True, momentum=momentum, momentum_warmup=True
        )

    with pytest.raises(TypeError, match="`momentum` must be a Python number"):
        step(0.9)


def test_factory_binds_the_warmup():
    norm = bnjax.batchnorm(momentum=0.99, momentum_warmup=True)
    params, state = norm.init((16, 3))
    x = _batches(1)[0]
    _, state = norm.apply(params, state, x, True)
    # The first warm-up update replaces the initial statistics by the batch's.
    _, mean, var = references.batchnorm(x, None, None)
    np.testing.assert_allclose(state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, var, **TOL["float32"])
