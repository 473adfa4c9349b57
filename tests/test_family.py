"""GroupNorm, InstanceNorm, RMSNorm, Batch Renorm and ghost BatchNorm against references.

Expected values come from PyTorch's functional ops (float64) or from the
float64 numpy formulas in `references`, never from bnjax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnjax
from tests import references
from tests.helpers import f64, random_input, random_mask, random_params
from tests.tolerances import FINITE_DIFFERENCE_TOL, LARGE_MEAN_TOL, TOL


def _jit(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` under `jax.jit`: one compilation instead of one per operation."""
    return jax.jit(lambda: fn(*args, **kwargs))()


def _state(mean, var, dtype=np.float32):
    return bnjax.BatchStats(
        jnp.asarray(mean, dtype), jnp.asarray(var, dtype), jnp.zeros((), jnp.int32)
    )


def _to_nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def _to_nchw(x):
    return np.moveaxis(np.asarray(x), -1, 1)


# --- PyTorch functional ops, float64: forward and gradients -----------------


def _jax_value_and_grads(fn, params, x, dy):
    """`fn(params, x)` and the gradients of `sum(fn(params, x) * dy)` w.r.t. x and params."""
    x, dy = jnp.asarray(x), jnp.asarray(dy)

    def loss(x, params):
        return jnp.sum(fn(params, x) * dy)

    grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    return jax.jit(fn)(params, x), grad_x, grad_params


def _torch_value_and_grads(fn, x, weight, bias, dy):
    """`fn(x, weight, bias)` in float64 torch, and the gradients of `sum(y * dy)`."""
    x, weight, bias = (
        None if a is None else torch.tensor(np.asarray(a, np.float64), requires_grad=True)
        for a in (x, weight, bias)
    )
    y = fn(x, weight, bias)
    (y * torch.tensor(np.asarray(dy, np.float64))).sum().backward()
    grads = [None if a is None else a.grad.numpy() for a in (x, weight, bias)]
    return (y.detach().numpy(), *grads)


def _assert_value_and_grads_match(ours, theirs, tol):
    y, grad_x, grad_params = ours
    y_ref, grad_x_ref, grad_scale_ref, grad_bias_ref = theirs
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(grad_x, grad_x_ref, **tol)
    np.testing.assert_allclose(grad_params.scale, grad_scale_ref, **tol)
    if grad_bias_ref is not None:
        np.testing.assert_allclose(grad_params.bias, grad_bias_ref, **tol)


def _float64_case(seed, shape, num_features):
    rng = np.random.default_rng(seed)
    x = random_input(rng, shape, np.float64)
    params = random_params(rng, num_features, np.float64)
    dy = rng.normal(size=shape)
    return x, params, dy


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6], ids=["G1", "G2", "G3", "G6"])
def test_groupnorm_matches_torch_group_norm_with_gradients(x64, num_groups, layout):
    x, params, dy = _float64_case(0, (2, 6, 3, 4), 6)

    def torch_fn(x, weight, bias):
        return F.group_norm(x, num_groups, weight, bias, eps=1e-5)

    theirs = _torch_value_and_grads(torch_fn, x, params.scale, params.bias, dy)
    if layout == "NCHW":
        ours = _jax_value_and_grads(
            lambda p, x: _jit(bnjax.groupnorm_apply, p, x, num_groups=num_groups, axis=1),
            params,
            x,
            dy,
        )
    else:
        y, grad_x, grad_params = _jax_value_and_grads(
            lambda p, x: _jit(bnjax.groupnorm_apply, p, x, num_groups=num_groups, axis=-1),
            params,
            _to_nhwc(x),
            _to_nhwc(dy),
        )
        ours = (_to_nchw(y), _to_nchw(grad_x), grad_params)
    _assert_value_and_grads_match(ours, theirs, TOL["float64"])


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 6)], ids=["NCHW", "NCL"])
def test_instancenorm_matches_torch_instance_norm_with_gradients(x64, shape):
    x, params, dy = _float64_case(1, shape, shape[1])

    def torch_fn(x, weight, bias):
        return F.instance_norm(x, weight=weight, bias=bias, eps=1e-5)

    theirs = _torch_value_and_grads(torch_fn, x, params.scale, params.bias, dy)
    ours = _jax_value_and_grads(
        lambda p, x: _jit(bnjax.instancenorm_apply, p, x, axis=1), params, x, dy
    )
    _assert_value_and_grads_match(ours, theirs, TOL["float64"])


@pytest.mark.parametrize(
    "shape, normalized_shape",
    [((6, 8), (8,)), ((3, 4, 5), (4, 5)), ((2, 3, 4, 5), (3, 4, 5))],
    ids=["last-1", "last-2", "last-3"],
)
def test_layernorm_matches_torch_layer_norm_with_gradients(x64, shape, normalized_shape):
    rng = np.random.default_rng(2)
    x = random_input(rng, shape, np.float64)
    dy = rng.normal(size=shape)
    params = bnjax.NormParams(
        jnp.asarray(rng.uniform(0.5, 2.0, normalized_shape)),
        jnp.asarray(rng.normal(size=normalized_shape)),
    )
    axes = tuple(range(-len(normalized_shape), 0))

    def torch_fn(x, weight, bias):
        return F.layer_norm(x, normalized_shape, weight, bias, eps=1e-5)

    theirs = _torch_value_and_grads(torch_fn, x, params.scale, params.bias, dy)
    ours = _jax_value_and_grads(
        lambda p, x: _jit(bnjax.layernorm_apply, p, x, axis=axes), params, x, dy
    )
    _assert_value_and_grads_match(ours, theirs, TOL["float64"])


@pytest.mark.parametrize(
    "shape, normalized_shape",
    [((6, 8), (8,)), ((3, 4, 5), (4, 5))],
    ids=["last-1", "last-2"],
)
def test_rmsnorm_matches_torch_rms_norm_with_gradients(x64, shape, normalized_shape):
    rng = np.random.default_rng(3)
    x = random_input(rng, shape, np.float64)
    dy = rng.normal(size=shape)
    params = bnjax.NormParams(jnp.asarray(rng.uniform(0.5, 2.0, normalized_shape)), None)
    axes = tuple(range(-len(normalized_shape), 0))

    def torch_fn(x, weight, bias):
        return F.rms_norm(x, normalized_shape, weight, eps=1e-6)

    theirs = _torch_value_and_grads(torch_fn, x, params.scale, None, dy)
    ours = _jax_value_and_grads(
        lambda p, x: _jit(bnjax.rmsnorm_apply, p, x, axis=axes, epsilon=1e-6), params, x, dy
    )
    _assert_value_and_grads_match(ours, theirs, TOL["float64"])


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (8, 3)], ids=["NCHW", "NC"])
def test_batchnorm_axis1_matches_torch_batch_norm_with_gradients(x64, shape):
    x, params, dy = _float64_case(4, shape, 3)
    state = _state(np.zeros(3), np.ones(3), np.float64)

    def torch_fn(x, weight, bias):
        running = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        return F.batch_norm(x, *running, weight, bias, training=True, momentum=0.1, eps=1e-5)

    theirs = _torch_value_and_grads(torch_fn, x, params.scale, params.bias, dy)
    ours = _jax_value_and_grads(
        lambda p, x: _jit(bnjax.batchnorm_apply, p, state, x, True, axis=1)[0], params, x, dy
    )
    _assert_value_and_grads_match(ours, theirs, TOL["float64"])


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (8, 3)], ids=["NCHW", "NC"])
def test_batchnorm_running_stats_match_torch_after_converting_conventions(x64, shape):
    x, params, _ = _float64_case(5, shape, 3)
    momentum = 0.9
    running_mean = np.array([0.5, -1.0, 2.0])
    running_var = np.array([0.5, 1.5, 3.0])
    torch_mean, torch_var = torch.tensor(running_mean), torch.tensor(running_var)
    F.batch_norm(
        torch.tensor(x), torch_mean, torch_var, training=True, momentum=1 - momentum, eps=1e-5
    )
    n = x.size // 3

    _, state = _jit(
        bnjax.batchnorm_apply,
        params,
        _state(running_mean, running_var, np.float64),
        jnp.asarray(x),
        True,
        axis=1,
    )

    np.testing.assert_allclose(state.mean, torch_mean.numpy(), **TOL["float64"])
    # PyTorch folds in the unbiased batch variance; bnjax the biased one.
    biased_update = (torch_var.numpy() - momentum * running_var) * (n - 1) / n
    np.testing.assert_allclose(state.var, momentum * running_var + biased_update, **TOL["float64"])


# --- float64 numpy references ---------------------------------------------

GROUPNORM_CASES = [
    ((4, 6, 6), -1, 3),
    ((2, 5, 4, 8), -1, 4),
    ((2, 5, 4, 8), -1, 1),
    ((2, 8, 3, 4), 1, 2),
    ((2, 3, 2, 4, 6), -1, 2),
    ((2, 6, 2, 3, 4), 1, 6),
]
GROUPNORM_IDS = ["NLC-G3", "NHWC-G4", "NHWC-G1", "NCHW-G2", "NDHWC-G2", "NCDHW-G6"]


@pytest.mark.parametrize("shape, axis, num_groups", GROUPNORM_CASES, ids=GROUPNORM_IDS)
def test_groupnorm_matches_float64_reference(shape, axis, num_groups):
    rng = np.random.default_rng(10)
    x = random_input(rng, shape)
    params = random_params(rng, shape[axis])

    y = _jit(bnjax.groupnorm_apply, params, jnp.asarray(x), num_groups=num_groups, axis=axis)

    expected = references.groupnorm(
        x, f64(params.scale), f64(params.bias), num_groups=num_groups, axis=axis
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, axis",
    [((4, 6, 3), -1), ((2, 5, 4, 3), -1), ((2, 3, 5, 4), 1), ((2, 2, 3, 4, 3), -1)],
    ids=["NLC", "NHWC", "NCHW", "NDHWC"],
)
def test_instancenorm_matches_float64_reference(shape, axis):
    rng = np.random.default_rng(11)
    x = random_input(rng, shape)
    params = random_params(rng, shape[axis])

    y = _jit(bnjax.instancenorm_apply, params, jnp.asarray(x), axis=axis)

    expected = references.instancenorm(x, f64(params.scale), f64(params.bias), axis=axis)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, axes",
    [((4, 8), (-1,)), ((3, 4, 5), (1, 2)), ((3, 4, 5), (0, 2)), ((2, 3, 4, 5), (1, 3))],
    ids=["last", "last-2", "0-and-2", "1-and-3"],
)
def test_rmsnorm_over_axis_tuple_matches_float64_reference(shape, axes):
    rng = np.random.default_rng(12)
    x = random_input(rng, shape)
    scale = rng.uniform(0.5, 2.0, [shape[a] for a in axes]).astype(np.float32)
    params = bnjax.NormParams(jnp.asarray(scale), None)

    y = _jit(bnjax.rmsnorm_apply, params, jnp.asarray(x), axis=axes)

    np.testing.assert_allclose(y, references.rmsnorm(x, scale, axes=axes), **TOL["float32"])


# Running statistics relative to the batch's: (mean offset in batch stds, var factor),
# and (r_max, d_max). What gets clipped is asserted on the reference in the test.
RENORM_CASES = [
    ((0.3, 1.4), (3.0, 5.0), "none"),
    ((-0.5, 0.6), (3.0, 5.0), "none"),
    ((20.0, 0.02), (3.0, 5.0), "both"),
    ((3.0, 50.0), (1.5, 0.1), "both"),
    ((0.2, 4.0), (1.5, 5.0), "r"),
    ((4.0, 1.2), (3.0, 1.0), "d"),
]
RENORM_IDS = ["unclipped", "unclipped-narrow", "clipped-up", "clipped-down", "r-only", "d-only"]


def _renorm_case(seed, shape, offset_and_factor):
    """Input, params and running statistics at a given offset from the batch's."""
    rng = np.random.default_rng(seed)
    x = random_input(rng, shape)
    params = random_params(rng, shape[-1])
    offset, factor = offset_and_factor
    batch_mean = x.reshape(-1, shape[-1]).mean(axis=0)
    batch_var = x.reshape(-1, shape[-1]).var(axis=0)
    running_var = batch_var * factor * rng.uniform(0.9, 1.1, shape[-1])
    running_mean = batch_mean - offset * np.sqrt(running_var) * rng.uniform(0.9, 1.1, shape[-1])
    return x, params, running_mean.astype(np.float32), running_var.astype(np.float32)


def _assert_clipping(r, d, r_max, d_max, clipped):
    r_clipped = np.all(np.isclose(np.abs(np.log(r)), np.log(r_max)))
    d_clipped = np.all(np.isclose(np.abs(d), d_max))
    assert r_clipped == (clipped in ("r", "both")), r
    assert d_clipped == (clipped in ("d", "both")), d


@pytest.mark.parametrize("stats, limits, clipped", RENORM_CASES, ids=RENORM_IDS)
@pytest.mark.parametrize("shape", [(16, 3), (3, 4, 5, 3)], ids=["NC", "NHWC"])
def test_batchrenorm_output_matches_float64_reference(shape, stats, limits, clipped):
    x, params, running_mean, running_var = _renorm_case(20, shape, stats)
    r_max, d_max = limits

    y, _ = _jit(
        bnjax.batchrenorm_apply,
        params,
        _state(running_mean, running_var),
        jnp.asarray(x),
        True,
        r_max=r_max,
        d_max=d_max,
    )

    expected, _, _, r, d = references.batchrenorm(
        x,
        f64(params.scale),
        f64(params.bias),
        running_mean,
        running_var,
        r_max=r_max,
        d_max=d_max,
    )
    _assert_clipping(r, d, r_max, d_max, clipped)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("stats, limits, clipped", RENORM_CASES[::2], ids=RENORM_IDS[::2])
def test_batchrenorm_running_update_is_batchnorms(stats, limits, clipped):
    x, params, running_mean, running_var = _renorm_case(21, (3, 4, 5, 3), stats)
    momentum = 0.8

    _, state = _jit(
        bnjax.batchrenorm_apply,
        params,
        _state(running_mean, running_var),
        jnp.asarray(x),
        True,
        momentum=momentum,
        r_max=limits[0],
        d_max=limits[1],
    )

    _, batch_mean, batch_var, _, _ = references.batchrenorm(
        x, None, None, running_mean, running_var
    )
    mean, var = references.running_stats(
        [batch_mean], [batch_var], momentum, mean=running_mean, var=running_var
    )
    np.testing.assert_allclose(state.mean, mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, var, **TOL["float32"])
    assert int(state.count) == 1


def _central_differences(f, x, h=1e-6):
    """The gradient of the scalar float64 function `f` at `x`, by central differences."""
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _renorm_grad_case(stats, limits):
    x, params, running_mean, running_var = _renorm_case(22, (6, 3), stats)
    x = x.astype(np.float64)
    dy = np.random.default_rng(23).normal(size=x.shape)
    params64 = bnjax.NormParams(jnp.asarray(f64(params.scale)), jnp.asarray(f64(params.bias)))
    state64 = _state(running_mean, running_var, np.float64)

    def loss(x):
        y, _ = _jit(
            bnjax.batchrenorm_apply, params64, state64, x, True, r_max=limits[0], d_max=limits[1]
        )
        return jnp.sum(y * jnp.asarray(dy))

    def reference_loss(x, fixed):
        y, _, _, _, _ = references.batchrenorm(
            x,
            f64(params.scale),
            f64(params.bias),
            running_mean,
            running_var,
            r_max=limits[0],
            d_max=limits[1],
            **fixed,
        )
        return np.sum(y * dy)

    _, _, _, r, d = references.batchrenorm(
        x, None, None, running_mean, running_var, r_max=limits[0], d_max=limits[1]
    )
    return x, jax.jit(jax.grad(loss))(jnp.asarray(x)), reference_loss, {"r": r, "d": d}


@pytest.mark.parametrize("stats, limits, clipped", RENORM_CASES, ids=RENORM_IDS)
def test_batchrenorm_gradient_holds_r_and_d_constant(x64, stats, limits, clipped):
    x, grad, reference_loss, r_and_d = _renorm_grad_case(stats, limits)

    expected = _central_differences(lambda x: reference_loss(x, r_and_d), x)

    np.testing.assert_allclose(grad, expected, **FINITE_DIFFERENCE_TOL)


def test_batchrenorm_gradient_differs_from_gradient_through_r_and_d(x64):
    # Unclipped, r and d depend on x; differentiating through them would
    # give the gradient of (x - running_mean) / sigma * scale + bias instead.
    x, grad, reference_loss, _ = _renorm_grad_case(*RENORM_CASES[0][:2])

    through_r_and_d = _central_differences(lambda x: reference_loss(x, {}), x)

    assert np.max(np.abs(grad - through_r_and_d)) > 1e-2


GHOST_CASES = [((8, 3), -1, 2), ((8, 3), -1, 4), ((6, 4, 3), -1, 3), ((4, 3, 2, 2), 1, 2)]
GHOST_IDS = ["NC-v2", "NC-v4", "NTC-v3", "NCHW-v2"]


def _ghost_training_step(seed, shape, axis, virtual_batch_size):
    """One jitted ghost-BatchNorm training call on random input: `(x, params, y, state)`."""
    rng = np.random.default_rng(seed)
    x = random_input(rng, shape)
    params, state = random_params(rng, shape[axis]), bnjax.batchnorm_init(shape[axis])[1]
    y, state = _jit(
        bnjax.batchnorm_apply,
        params,
        state,
        jnp.asarray(x),
        True,
        axis=axis,
        virtual_batch_size=virtual_batch_size,
    )
    return x, params, y, state


@pytest.mark.parametrize("shape, axis, virtual_batch_size", GHOST_CASES, ids=GHOST_IDS)
def test_ghost_batchnorm_output_matches_float64_reference(shape, axis, virtual_batch_size):
    x, params, y, _ = _ghost_training_step(30, shape, axis, virtual_batch_size)

    expected, _, _ = references.ghost_batchnorm(
        x,
        f64(params.scale),
        f64(params.bias),
        virtual_batch_size=virtual_batch_size,
        axis=axis,
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("shape, axis, virtual_batch_size", GHOST_CASES, ids=GHOST_IDS)
def test_ghost_batchnorm_updates_running_stats_once_with_average_of_groups(
    shape, axis, virtual_batch_size
):
    x, _, _, state = _ghost_training_step(31, shape, axis, virtual_batch_size)

    _, mean, var = references.ghost_batchnorm(
        x, None, None, virtual_batch_size=virtual_batch_size, axis=axis
    )
    expected_mean, expected_var = references.running_stats([mean], [var], 0.9)
    np.testing.assert_allclose(state.mean, expected_mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, expected_var, **TOL["float32"])
    assert int(state.count) == 1


# --- Equivalences ----------------------------------------------------------


@pytest.mark.parametrize(
    "shape, axis",
    [((2, 4, 5, 6), -1), ((2, 6, 4, 5), 1), ((3, 7, 4), -1)],
    ids=["NHWC", "NCHW", "NLC"],
)
def test_groupnorm_with_one_group_is_layernorm_with_per_channel_affine(shape, axis):
    rng = np.random.default_rng(40)
    x = jnp.asarray(random_input(rng, shape))
    params = random_params(rng, shape[axis])
    non_batch = tuple(range(1, len(shape)))
    unit = bnjax.layernorm_init(shape[1:], use_scale=False, use_bias=False)
    channel_shape = [1] * len(shape)
    channel_shape[axis] = shape[axis]

    y = _jit(bnjax.groupnorm_apply, params, x, num_groups=1, axis=axis)

    normalized = _jit(bnjax.layernorm_apply, unit, x, axis=non_batch)
    expected = normalized * params.scale.reshape(channel_shape) + params.bias.reshape(channel_shape)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, axis",
    [((2, 4, 5, 6), -1), ((2, 6, 4, 5), 1), ((3, 7, 4), -1)],
    ids=["NHWC", "NCHW", "NLC"],
)
def test_groupnorm_with_one_group_per_channel_is_instancenorm(shape, axis):
    rng = np.random.default_rng(41)
    x = jnp.asarray(random_input(rng, shape))
    params = random_params(rng, shape[axis])

    y = _jit(bnjax.groupnorm_apply, params, x, num_groups=shape[axis], axis=axis)

    np.testing.assert_allclose(
        y, _jit(bnjax.instancenorm_apply, params, x, axis=axis), **TOL["float32"]
    )


@pytest.mark.parametrize("shape", [(16, 3), (3, 4, 5, 3)], ids=["NC", "NHWC"])
def test_batchrenorm_with_r_max_1_and_d_max_0_is_batchnorm_over_several_steps(shape):
    rng = np.random.default_rng(42)
    params = random_params(rng, shape[-1])
    renorm_state = batchnorm_state = _state(rng.normal(size=3), rng.uniform(0.2, 3.0, 3))
    for step in range(3):
        x = jnp.asarray(random_input(rng, shape) * (step + 1))
        y_renorm, renorm_state = _jit(
            bnjax.batchrenorm_apply, params, renorm_state, x, True, r_max=1.0, d_max=0.0
        )
        y, batchnorm_state = _jit(bnjax.batchnorm_apply, params, batchnorm_state, x, True)

        np.testing.assert_allclose(y_renorm, y, **TOL["float32"])
        for ours, theirs in zip(renorm_state, batchnorm_state, strict=True):
            np.testing.assert_allclose(ours, theirs, **TOL["float32"])


@pytest.mark.parametrize("shape, axis", [((8, 3), -1), ((4, 3, 2, 2), 1)], ids=["NC", "NCHW"])
def test_ghost_batchnorm_with_one_group_is_batchnorm(shape, axis):
    rng = np.random.default_rng(43)
    x = jnp.asarray(random_input(rng, shape))
    params, state = random_params(rng, 3), bnjax.batchnorm_init(3)[1]

    y, ghost_state = _jit(
        bnjax.batchnorm_apply, params, state, x, True, axis=axis, virtual_batch_size=shape[0]
    )

    expected, expected_state = _jit(bnjax.batchnorm_apply, params, state, x, True, axis=axis)
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    for ours, theirs in zip(ghost_state, expected_state, strict=True):
        np.testing.assert_allclose(ours, theirs, **TOL["float32"])


def _groupnorm(params, state, x, axis):
    return _jit(bnjax.groupnorm_apply, params, x, num_groups=2, axis=axis), state


def _instancenorm(params, state, x, axis):
    return _jit(bnjax.instancenorm_apply, params, x, axis=axis), state


def _batchnorm(params, state, x, axis):
    return _jit(bnjax.batchnorm_apply, params, state, x, True, axis=axis)


def _batchrenorm(params, state, x, axis):
    return _jit(bnjax.batchrenorm_apply, params, state, x, True, axis=axis, r_max=1.2, d_max=0.3)


@pytest.mark.parametrize(
    "apply",
    [_groupnorm, _instancenorm, _batchnorm, _batchrenorm],
    ids=["groupnorm", "instancenorm", "batchnorm", "batchrenorm"],
)
def test_axis1_on_nchw_equals_axis_last_on_transposed_nhwc(apply):
    rng = np.random.default_rng(44)
    x = random_input(rng, (3, 4, 5, 2))
    params = random_params(rng, 4)
    state = _state(rng.normal(size=4), rng.uniform(0.2, 3.0, 4))

    y, new_state = apply(params, state, jnp.asarray(x), 1)

    expected, expected_state = apply(params, state, jnp.asarray(_to_nhwc(x)), -1)
    np.testing.assert_allclose(y, _to_nchw(expected), **TOL["float32"])
    for ours, theirs in zip(new_state, expected_state, strict=True):
        np.testing.assert_allclose(ours, theirs, **TOL["float32"])


# --- Masks -----------------------------------------------------------------


def _example_mask(rng, shape):
    """`random_mask` (about 2/3 True) with at least two True entries in every example."""
    mask = random_mask(rng, shape, fraction=2 / 3)
    mask.reshape(shape[0], -1)[:, -2:] = True
    return mask


# (x shape, channel axis, mask shape): a mask without the channel axis for
# channels-last input, one of x's rank with size 1 there for NCHW.
@pytest.mark.parametrize(
    "shape, axis, num_groups, mask_shape",
    [
        ((3, 4, 5, 6), -1, 2, (3, 4, 5)),
        ((3, 6, 4, 5), 1, 3, (3, 1, 4, 5)),
        ((4, 7, 4), -1, 4, (4, 7)),
    ],
    ids=["NHWC-G2", "NCHW-G3", "NLC-G4"],
)
def test_masked_groupnorm_matches_reference_on_unmasked_entries(
    shape, axis, num_groups, mask_shape
):
    rng = np.random.default_rng(50)
    x = random_input(rng, shape)
    params = random_params(rng, shape[axis])
    mask = _example_mask(rng, mask_shape)

    y = _jit(
        bnjax.groupnorm_apply, params, jnp.asarray(x), num_groups=num_groups, axis=axis, mask=mask
    )

    expected = references.groupnorm(
        x,
        f64(params.scale),
        f64(params.bias),
        num_groups=num_groups,
        axis=axis,
        mask=references.full_mask(mask, shape),
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, axis, mask_shape",
    [((3, 4, 5, 6), -1, (3, 4, 5)), ((3, 6, 4, 5), 1, (3, 1, 4, 5)), ((4, 7, 4), -1, (4, 7))],
    ids=["NHWC", "NCHW", "NLC"],
)
def test_masked_instancenorm_matches_reference_on_unmasked_entries(shape, axis, mask_shape):
    rng = np.random.default_rng(51)
    x = random_input(rng, shape)
    params = random_params(rng, shape[axis])
    mask = _example_mask(rng, mask_shape)

    y = _jit(bnjax.instancenorm_apply, params, jnp.asarray(x), axis=axis, mask=mask)

    expected = references.instancenorm(
        x, f64(params.scale), f64(params.bias), axis=axis, mask=references.full_mask(mask, shape)
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])


def _row_mask(rng, mask_shape):
    """A random mask with at least two True entries in every normalized row."""
    mask = rng.random(mask_shape) < 2 / 3
    if mask_shape[-1] == 1:
        mask[:, :2] = True
    else:
        mask[..., :2] = True
    return mask


@pytest.mark.parametrize(
    "shape, axes, mask_shape",
    [((4, 6, 5), (-1,), (4, 6, 5)), ((4, 6, 5), (1, 2), (4, 6, 1))],
    ids=["last-full-mask", "last-2-row-mask"],
)
def test_masked_layernorm_matches_reference_on_unmasked_entries(shape, axes, mask_shape):
    rng = np.random.default_rng(52)
    x = random_input(rng, shape)
    feature_shape = [shape[a] for a in axes]
    params = bnjax.NormParams(
        jnp.asarray(rng.uniform(0.5, 2.0, feature_shape), jnp.float32),
        jnp.asarray(rng.normal(size=feature_shape), jnp.float32),
    )
    mask = _row_mask(rng, mask_shape)

    y = _jit(bnjax.layernorm_apply, params, jnp.asarray(x), axis=axes, mask=mask)

    expected = references.layernorm(x, f64(params.scale), f64(params.bias), axes=axes, mask=mask)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, axes, mask_shape",
    [((4, 6, 5), (-1,), (4, 6, 5)), ((4, 6, 5), (1, 2), (4, 6, 1))],
    ids=["last-full-mask", "last-2-row-mask"],
)
def test_masked_rmsnorm_matches_reference_on_unmasked_entries(shape, axes, mask_shape):
    rng = np.random.default_rng(53)
    x = random_input(rng, shape)
    scale = rng.uniform(0.5, 2.0, [shape[a] for a in axes]).astype(np.float32)
    mask = _row_mask(rng, mask_shape)
    params = bnjax.NormParams(jnp.asarray(scale), None)

    y = _jit(bnjax.rmsnorm_apply, params, jnp.asarray(x), axis=axes, mask=mask)

    expected = references.rmsnorm(x, scale, axes=axes, mask=mask)
    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, mask_shape",
    [((16, 3), (16,)), ((3, 4, 5, 3), (3, 4, 5)), ((3, 4, 5, 3), (3, 1, 1))],
    ids=["NC", "NHWC", "NHWC-per-example"],
)
def test_masked_batchrenorm_matches_reference_on_unmasked_entries(shape, mask_shape):
    x, params, running_mean, running_var = _renorm_case(54, shape, RENORM_CASES[0][0])
    mask = np.random.default_rng(55).random(mask_shape) < 2 / 3
    mask.reshape(-1)[:2] = True

    y, state = _jit(
        bnjax.batchrenorm_apply,
        params,
        _state(running_mean, running_var),
        jnp.asarray(x),
        True,
        mask=mask,
    )

    expected, mean, var, _, _ = references.batchrenorm(
        x,
        f64(params.scale),
        f64(params.bias),
        running_mean,
        running_var,
        mask=mask[..., None],
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    expected_mean, expected_var = references.running_stats(
        [mean], [var], 0.9, mean=running_mean, var=running_var
    )
    np.testing.assert_allclose(state.mean, expected_mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, expected_var, **TOL["float32"])


@pytest.mark.parametrize(
    "shape, mask_shape, virtual_batch_size",
    [((8, 3), (8,), 4), ((6, 4, 3), (6, 4), 3), ((6, 4, 3), (6, 1), 2)],
    ids=["NC-v4", "NTC-v3", "NTC-per-example-v2"],
)
def test_masked_ghost_batchnorm_matches_reference_on_unmasked_entries(
    shape, mask_shape, virtual_batch_size
):
    rng = np.random.default_rng(56)
    x = random_input(rng, shape)
    params, state = random_params(rng, 3), bnjax.batchnorm_init(3)[1]
    mask = rng.random(mask_shape) < 0.6
    # At least two unmasked entries per feature in every group. In the NC
    # and NTC cases the groups' counts differ (4 vs 3, 9 vs 10), so the
    # running update must weight each group by its count.
    mask[::virtual_batch_size] = True
    if mask.ndim == 1:
        mask[1::virtual_batch_size] = True

    y, state = _jit(
        bnjax.batchnorm_apply,
        params,
        state,
        jnp.asarray(x),
        True,
        virtual_batch_size=virtual_batch_size,
        mask=mask,
    )

    expected, mean, var = references.ghost_batchnorm(
        x,
        f64(params.scale),
        f64(params.bias),
        virtual_batch_size=virtual_batch_size,
        mask=mask[..., None],
    )
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    expected_mean, expected_var = references.running_stats([mean], [var], 0.9)
    np.testing.assert_allclose(state.mean, expected_mean, **TOL["float32"])
    np.testing.assert_allclose(state.var, expected_var, **TOL["float32"])


MASKED_APPLIES = {
    "groupnorm": lambda x, m: _jit(
        bnjax.groupnorm_apply, bnjax.groupnorm_init(4), x, num_groups=2, mask=m
    ),
    "instancenorm": lambda x, m: _jit(bnjax.instancenorm_apply, bnjax.groupnorm_init(4), x, mask=m),
    "layernorm": lambda x, m: _jit(
        bnjax.layernorm_apply, bnjax.layernorm_init(4), x, mask=m[..., None]
    ),
    "rmsnorm": lambda x, m: _jit(bnjax.rmsnorm_apply, bnjax.rmsnorm_init(4), x, mask=m[..., None]),
    "batchrenorm": lambda x, m: _jit(
        bnjax.batchrenorm_apply, *bnjax.batchnorm_init(4), x, True, mask=m
    )[0],
    "ghost-batchnorm": lambda x, m: _jit(
        bnjax.batchnorm_apply, *bnjax.batchnorm_init(4), x, True, mask=m, virtual_batch_size=2
    )[0],
}


@pytest.mark.parametrize("name", list(MASKED_APPLIES))
def test_masked_entries_do_not_change_unmasked_outputs(name):
    rng = np.random.default_rng(57)
    x = random_input(rng, (4, 6, 4))
    mask = _example_mask(rng, (4, 6))
    perturbed = np.where(mask[..., None], x, x + rng.normal(size=x.shape) * 100).astype(np.float32)
    apply = MASKED_APPLIES[name]

    y = apply(jnp.asarray(x), mask)
    y_perturbed = apply(jnp.asarray(perturbed), mask)

    keep = np.broadcast_to(mask[..., None], x.shape)
    np.testing.assert_allclose(np.asarray(y_perturbed)[keep], np.asarray(y)[keep], **TOL["float32"])
    assert not np.allclose(np.asarray(y_perturbed)[~keep], np.asarray(y)[~keep])


# --- dtypes ----------------------------------------------------------------


def _apply(name, params, x, state):
    """bnjax's output and new state (None for stateless normalizers) for one normalizer."""
    if name == "groupnorm":
        return _jit(bnjax.groupnorm_apply, params, x, num_groups=2), None
    if name == "instancenorm":
        return _jit(bnjax.instancenorm_apply, params, x), None
    if name == "rmsnorm":
        return _jit(bnjax.rmsnorm_apply, params._replace(bias=None), x), None
    if name == "batchrenorm":
        return _jit(bnjax.batchrenorm_apply, params, state, x, True, r_max=1.5, d_max=0.5)
    return _jit(bnjax.batchnorm_apply, params, state, x, True, virtual_batch_size=2)


def _reference(name, x, scale, bias, running_mean, running_var):
    """The float64 reference output matching `_apply`."""
    x = np.asarray(x, np.float64)
    if name == "groupnorm":
        return references.groupnorm(x, scale, bias, num_groups=2)
    if name == "instancenorm":
        return references.instancenorm(x, scale, bias)
    if name == "rmsnorm":
        return references.rmsnorm(x, scale)
    if name == "batchrenorm":
        return references.batchrenorm(
            x, scale, bias, running_mean, running_var, r_max=1.5, d_max=0.5
        )[0]
    return references.ghost_batchnorm(x, scale, bias, virtual_batch_size=2)[0]


DTYPE_NAMES = ["groupnorm", "instancenorm", "rmsnorm", "batchrenorm", "ghost-batchnorm"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_low_precision_input_gives_its_dtype_and_matches_reference(name, dtype):
    rng = np.random.default_rng(60)
    x = jnp.asarray(random_input(rng, (4, 3, 5, 4))).astype(dtype)
    params = random_params(rng, 4)
    running_mean, running_var = rng.normal(size=4), np.ones(4)

    y, new_state = _apply(name, params, x, _state(running_mean, running_var))

    assert y.dtype == dtype
    if new_state is not None:
        assert new_state.mean.dtype == new_state.var.dtype == jnp.float32
    expected = _reference(name, x, f64(params.scale), f64(params.bias), running_mean, running_var)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, **TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_float32_params_keep_float32_gradients_for_bfloat16_input(name):
    rng = np.random.default_rng(61)
    x = jnp.asarray(random_input(rng, (4, 3, 5, 4))).astype(jnp.bfloat16)
    state = bnjax.batchnorm_init(4)[1]

    def loss(params):
        y, _ = _apply(name, params, x, state)
        return jnp.sum(y.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss))(random_params(rng, 4))

    assert grads.scale.dtype == jnp.float32
    if name != "rmsnorm":
        assert grads.bias.dtype == jnp.float32


@pytest.mark.parametrize("num_groups", [1, 2, 4], ids=["G1", "G2", "G4"])
def test_groupnorm_large_mean_channel_comes_out_with_unit_std(num_groups):
    rng = np.random.default_rng(62)
    x = (1e4 + rng.normal(size=(3, 8, 8, 4))).astype(np.float32)
    params = bnjax.groupnorm_init(4)

    y = _jit(bnjax.groupnorm_apply, params, jnp.asarray(x), num_groups=num_groups)

    grouped = np.asarray(y, np.float64).reshape(3, 64, num_groups, -1)
    std = grouped.std(axis=(1, 3))
    np.testing.assert_allclose(std, 1.0, rtol=0, atol=LARGE_MEAN_TOL)


# --- Errors ----------------------------------------------------------------


ERROR_CASES = {
    "num_groups-not-dividing": (
        lambda params, state, x: _jit(bnjax.groupnorm_apply, params, x, num_groups=4),
        "num_groups",
    ),
    "groupnorm-axis-0": (
        lambda params, state, x: _jit(
            bnjax.groupnorm_apply, bnjax.groupnorm_init(4), x, num_groups=2, axis=0
        ),
        "axis",
    ),
    "r_max-below-1": (
        lambda params, state, x: _jit(bnjax.batchrenorm_apply, params, state, x, True, r_max=0.9),
        "r_max",
    ),
    "d_max-negative": (
        lambda params, state, x: _jit(bnjax.batchrenorm_apply, params, state, x, True, d_max=-0.1),
        "d_max",
    ),
    "virtual_batch_size-not-dividing": (
        lambda params, state, x: _jit(
            bnjax.batchnorm_apply, params, state, x, True, virtual_batch_size=3
        ),
        "virtual_batch_size",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_argument_raises_value_error_naming_it(case):
    raises, name = ERROR_CASES[case]
    params, state = bnjax.batchnorm_init(6)

    with pytest.raises(ValueError, match=f"`{name}`"):
        raises(params, state, jnp.ones((4, 5, 6)))
