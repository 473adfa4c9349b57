"""Weight normalizations: Weight Norm, Spectral Norm and Weight Standardization.

PyTorch's parametrizations (`weight_norm`, `spectral_norm`, float64) are the
reference step for step, with their stored values converted by
`bnjax.convert`; sigma is checked against a float64 SVD and Weight
Standardization against a float64 formula (tests/references.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from jax.test_util import check_grads
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import bnjax
from bnjax import convert
from tests import references
from tests.tolerances import CHECK_GRADS_TOL, LARGE_MEAN_TOL, SPECTRAL_SIGMA_TOL, TOL

# PyTorch layers and the bnjax layout of their kernels: (in, out), (*spatial, in, out).
TORCH_LAYERS = {
    "linear": lambda: torch.nn.Linear(5, 4),
    "conv1d": lambda: torch.nn.Conv1d(3, 4, 2),
    "conv2d": lambda: torch.nn.Conv2d(2, 6, 3),
}


def _to_bnjax(t):
    """A torch `(out, in, *spatial)` tensor as bnjax's `(*spatial, in, out)` float64 array."""
    t = t.detach().numpy()
    return np.transpose(t, (*range(2, t.ndim), 1, 0))


def _to_torch(x):
    """A bnjax-layout `(*spatial, in, out)` array as a torch `(out, in, *spatial)` tensor."""
    x = np.asarray(x)
    return torch.from_numpy(np.transpose(x, (-1, -2, *range(x.ndim - 2))).copy())


def _cotangent(shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


def _torch_weight_norm(layer, seed):
    """A float64 `weight_norm` layer whose g and v are both away from their start."""
    module = weight_norm(TORCH_LAYERS[layer]().double())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g, v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
        g.copy_(torch.rand(g.shape, generator=gen, dtype=torch.float64) + 0.5)
        v.copy_(torch.randn(v.shape, generator=gen, dtype=torch.float64))
    return module


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layer", list(TORCH_LAYERS))
def test_weightnorm_matches_torch_weight_norm_and_its_gradients(layer):
    module = _torch_weight_norm(layer, seed=0)
    v, params = convert.from_torch_weightnorm(module.state_dict())
    cotangent = _cotangent(v.shape, seed=1)
    weight = module.weight
    (
        weight * torch.from_numpy(np.transpose(cotangent, (-1, -2, *range(v.ndim - 2))))
    ).sum().backward()

    def loss(scale, v):
        w = bnjax.weightnorm_apply(bnjax.NormParams(scale, None), v)
        return jnp.sum(w * cotangent), w

    (d_scale, d_v), w = jax.grad(loss, argnums=(0, 1), has_aux=True)(params.scale, v)
    np.testing.assert_allclose(w, _to_bnjax(weight), **TOL["float64"])
    parametrization = module.parametrizations.weight
    np.testing.assert_allclose(d_v, _to_bnjax(parametrization.original1.grad), **TOL["float64"])
    np.testing.assert_allclose(
        d_scale, parametrization.original0.grad.numpy().reshape(-1), **TOL["float64"]
    )


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layer", list(TORCH_LAYERS))
def test_weightnorm_init_is_torchs_g_and_gives_the_kernel_back(layer):
    dense = TORCH_LAYERS[layer]().double()
    kernel = jnp.asarray(_to_bnjax(dense.weight))
    g = weight_norm(dense).parametrizations.weight.original0  # g = ||weight|| when attached
    params = bnjax.weightnorm_init(kernel, param_dtype=jnp.float64)
    np.testing.assert_allclose(params.scale, g.detach().numpy().reshape(-1), **TOL["float64"])
    assert params.bias is None
    np.testing.assert_allclose(bnjax.weightnorm_apply(params, kernel), kernel, **TOL["float64"])


def _torch_spectral_norm(layer, num_iterations, seed):
    """A float64 `spectral_norm` layer whose kernel moved after its vectors were set.

    PyTorch runs 15 power iterations on the initial kernel when it attaches
    the parametrization; the new kernel makes the next iterations move u and v.
    """
    module = spectral_norm(TORCH_LAYERS[layer]().double(), n_power_iterations=num_iterations)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        original = module.parametrizations.weight.original
        original.add_(0.5 * torch.randn(original.shape, generator=gen, dtype=torch.float64))
    return module


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("num_iterations", [1, 3])
@pytest.mark.parametrize("layer", list(TORCH_LAYERS))
def test_spectralnorm_training_matches_torch_step_for_step(layer, num_iterations):
    module = _torch_spectral_norm(layer, num_iterations, seed=0).train()
    kernel, state = convert.from_torch_spectralnorm(module.state_dict())
    for step in range(2):  # the state from the first step feeds the second, in both
        cotangent = _cotangent(kernel.shape, seed=step)
        module.zero_grad()
        weight = module.weight  # one forward: num_iterations power iterations
        (weight * _to_torch(cotangent)).sum().backward()

        def loss(kernel, state, cotangent):
            w, new_state = bnjax.spectralnorm_apply(
                state, kernel, True, num_iterations=num_iterations
            )
            return jnp.sum(w * cotangent), (w, new_state)

        d_kernel, (w, state) = jax.grad(loss, has_aux=True)(kernel, state, cotangent)
        _, torch_state = convert.from_torch_spectralnorm(module.state_dict())
        np.testing.assert_allclose(w, _to_bnjax(weight), **TOL["float64"])
        np.testing.assert_allclose(state.u, torch_state.u, **TOL["float64"])
        np.testing.assert_allclose(state.v, torch_state.v, **TOL["float64"])
        original = module.parametrizations.weight.original
        np.testing.assert_allclose(d_kernel, _to_bnjax(original.grad), **TOL["float64"])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layer", list(TORCH_LAYERS))
def test_spectralnorm_eval_matches_torch_and_returns_the_state_unchanged(layer):
    module = _torch_spectral_norm(layer, 1, seed=1).eval()
    kernel, state = convert.from_torch_spectralnorm(module.state_dict())
    w, new_state = bnjax.spectralnorm_apply(state, kernel, False)
    assert new_state is state
    np.testing.assert_allclose(w, _to_bnjax(module.weight), **TOL["float64"])
    _, torch_state = convert.from_torch_spectralnorm(module.state_dict())
    np.testing.assert_array_equal(torch_state.u, state.u)  # torch's eval mode does not move either


def _kernel_with_spectrum(shape, axis, seed):
    """A float64 kernel whose matrix view has singular values 3, 2, 1, 0.5, ... (a known gap)."""
    rng = np.random.default_rng(seed)
    outputs = shape[axis]
    rest = int(np.prod(shape)) // outputs
    k = min(outputs, rest)
    left, _ = np.linalg.qr(rng.normal(size=(outputs, k)))
    right, _ = np.linalg.qr(rng.normal(size=(rest, k)))
    singular = np.array([3.0, 2.0, 1.0] + [0.5] * (k - 3))[:k]
    matrix = (left * singular) @ right.T
    moved = np.moveaxis(np.empty(shape), axis, 0).shape
    return np.moveaxis(matrix.reshape(moved), 0, axis)


SHAPES = {"dense": ((12, 8), -1), "hwio": ((3, 3, 4, 8), -1), "oihw-axis0": ((8, 4, 3, 3), 0)}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("shape, axis", list(SHAPES.values()), ids=list(SHAPES))
def test_spectralnorm_sigma_converges_to_the_largest_singular_value(shape, axis):
    kernel = jnp.asarray(_kernel_with_spectrum(shape, axis, seed=0))
    largest = np.linalg.svd(references.kernel_matrix(kernel, axis), compute_uv=False)[0]
    state = bnjax.spectralnorm_init(shape, jax.random.key(0), axis=axis, param_dtype=jnp.float64)

    def step(state, _):  # one power iteration per training call, the state carried along
        return bnjax.spectralnorm_apply(state, kernel, True, axis=axis)[1], None

    state, _ = lax.scan(step, state, None, length=100)
    w, _ = bnjax.spectralnorm_apply(state, kernel, False, axis=axis)
    sigma = np.linalg.norm(kernel) / np.linalg.norm(w)
    np.testing.assert_allclose(sigma, largest, **SPECTRAL_SIGMA_TOL)
    normalized = np.linalg.svd(references.kernel_matrix(w, axis), compute_uv=False)[0]
    np.testing.assert_allclose(normalized, 1.0, **SPECTRAL_SIGMA_TOL)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_spectralnorm_gradient_reaches_the_kernel_only_through_w(train):
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 5)))
    cotangent = rng.normal(size=kernel.shape)
    state = bnjax.spectralnorm_init(kernel.shape, jax.random.key(1), param_dtype=jnp.float64)

    def loss(kernel, state):
        w, new_state = bnjax.spectralnorm_apply(state, kernel, train, num_iterations=2)
        return jnp.sum(w * cotangent), new_state

    (d_kernel, d_state), new_state = jax.grad(loss, argnums=(0, 1), has_aux=True)(kernel, state)
    expected = references.spectralnorm_grad(kernel, new_state.u, new_state.v, cotangent)
    np.testing.assert_allclose(d_kernel, expected, **TOL["float64"])
    for leaf in jax.tree.leaves(d_state):  # the vectors carry no gradient
        np.testing.assert_array_equal(leaf, 0.0)


# Smooth functions of (s, v), s a per-output factor, for check_grads. In eval
# mode spectral norm's u and v are constants, so its derivative is the whole one.
SMOOTH = {
    "weightnorm": lambda state, s, v: bnjax.weightnorm_apply(bnjax.NormParams(s, None), v),
    "standardize": lambda state, s, v: s[None, None, None, :] * bnjax.weight_standardize(v),
    "spectralnorm-eval": lambda state, s, v: (
        s[None, None, None, :] * bnjax.spectralnorm_apply(state, v, False)[0]
    ),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("f", list(SMOOTH.values()), ids=list(SMOOTH))
def test_derivatives_are_correct_to_second_order(f):
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(2, 2, 2, 3)))
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=3))
    state = bnjax.spectralnorm_init(kernel.shape, jax.random.key(0), param_dtype=jnp.float64)
    check_grads(jax.jit(lambda s, v: f(state, s, v)), (scale, kernel), order=2, **CHECK_GRADS_TOL)


@pytest.mark.parametrize(
    "shape, axis", [((16, 8), -1), ((3, 3, 4, 8), -1), ((8, 4, 3, 3), 0), ((2, 6, 5), 1)]
)
def test_weight_standardize_matches_the_float64_formula(shape, axis):
    w = np.random.default_rng(0).normal(0.3, 2.0, size=shape).astype(np.float32)
    out = bnjax.weight_standardize(jnp.asarray(w), axis=axis)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, references.weight_standardize(w, axis=axis), **TOL["float32"])


def test_weight_standardize_is_stable_for_a_large_mean():
    w = (1e4 + np.random.default_rng(0).normal(size=(3, 3, 16, 4))).astype(np.float32)
    out = np.asarray(bnjax.weight_standardize(jnp.asarray(w)), np.float64)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=LARGE_MEAN_TOL)


def test_bfloat16_kernels_give_bfloat16_kernels_and_float32_state():
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.bfloat16)
    params = jax.eval_shape(bnjax.weightnorm_init, kernel)
    assert params.scale.dtype == jnp.float32
    assert jax.eval_shape(bnjax.weightnorm_apply, params, kernel).dtype == jnp.bfloat16
    assert jax.eval_shape(bnjax.weight_standardize, kernel).dtype == jnp.bfloat16
    state = jax.eval_shape(lambda: bnjax.spectralnorm_init(kernel.shape, jax.random.key(1)))
    w, new_state = jax.eval_shape(lambda s, k: bnjax.spectralnorm_apply(s, k, True), state, kernel)
    assert w.dtype == jnp.bfloat16
    assert new_state.u.dtype == new_state.v.dtype == jnp.float32


def test_factories_compute_what_the_functions_compute():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    key = jax.random.key(1)

    @jax.jit
    def factories(kernel):
        wn, sn = bnjax.weightnorm(epsilon=1e-8), bnjax.spectralnorm(num_iterations=2)
        w_wn, wn_state = wn.apply(*wn.init(kernel), kernel + 1.0, True)
        sn_params, sn_state = sn.init(jax.ShapeDtypeStruct(kernel.shape, kernel.dtype), key)
        return w_wn, wn_state, sn_params, sn.apply(sn_params, sn_state, kernel, True)

    @jax.jit
    def functions(kernel):
        params = bnjax.weightnorm_init(kernel)
        w_wn = bnjax.weightnorm_apply(params, kernel + 1.0, epsilon=1e-8)
        state = bnjax.spectralnorm_init(kernel.shape, key)
        return w_wn, bnjax.spectralnorm_apply(state, kernel, True, num_iterations=2)

    w_wn, wn_state, sn_params, (w_sn, sn_state) = factories(kernel)
    assert wn_state is None and sn_params is None
    expected_wn, (expected_sn, expected_state) = functions(kernel)
    np.testing.assert_array_equal(w_wn, expected_wn)
    np.testing.assert_array_equal(w_sn, expected_sn)
    np.testing.assert_array_equal(sn_state.u, expected_state.u)
    np.testing.assert_array_equal(sn_state.v, expected_state.v)


@pytest.mark.parametrize("shape", [(5, 4), (3, 3, 2, 4), (2, 3, 3, 3, 4)], ids=str)
def test_torch_parametrization_converters_round_trip_bit_exact(shape):
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    params = bnjax.weightnorm_init(kernel)
    state = bnjax.spectralnorm_init(shape, jax.random.key(0))
    v, back = convert.from_torch_weightnorm(convert.to_torch_weightnorm(kernel, params))
    np.testing.assert_array_equal(v, kernel)
    np.testing.assert_array_equal(back.scale, params.scale)
    k, back = convert.from_torch_spectralnorm(convert.to_torch_spectralnorm(kernel, state))
    np.testing.assert_array_equal(k, kernel)
    np.testing.assert_array_equal(back.u, state.u)
    np.testing.assert_array_equal(back.v, state.v)


@pytest.mark.usefixtures("x64")
def test_bnjax_values_loaded_into_torch_give_the_same_kernels():
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 6)))
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=6))
    state = bnjax.spectralnorm_init(kernel.shape, jax.random.key(0), param_dtype=jnp.float64)

    def loaded(module, state_dict):
        tensors = {k: torch.from_numpy(x) for k, x in state_dict.items()}
        module.load_state_dict(tensors, strict=False)
        return _to_bnjax(module.eval().weight)

    wn = loaded(
        weight_norm(torch.nn.Conv2d(2, 6, 3).double()),
        convert.to_torch_weightnorm(kernel, bnjax.NormParams(scale, None), prefix=""),
    )
    w = bnjax.weightnorm_apply(bnjax.NormParams(scale, None), kernel)
    np.testing.assert_allclose(wn, w, **TOL["float64"])
    sn = loaded(
        spectral_norm(torch.nn.Conv2d(2, 6, 3).double()),
        convert.to_torch_spectralnorm(kernel, state),
    )
    np.testing.assert_allclose(
        sn, bnjax.spectralnorm_apply(state, kernel, False)[0], **TOL["float64"]
    )


# Every error row: (call, exception, message).
K = jnp.ones((3, 3, 2, 4))
STATE = bnjax.spectralnorm_init(K.shape, jax.random.key(0))
WN = bnjax.weightnorm_init(K)
ERRORS = {
    "spectral-rank-1": (
        lambda: bnjax.spectralnorm_apply(STATE, jnp.ones(4), True),
        ValueError,
        r"`w` must have rank >= 2 \(an output axis and at least one other\), got shape \(4,\)",
    ),
    "spectral-init-rank-1": (
        lambda: bnjax.spectralnorm_init((4,), jax.random.key(0)),
        ValueError,
        r"`kernel_shape` must have rank >= 2",
    ),
    "standardize-rank-1": (
        lambda: bnjax.weight_standardize(jnp.ones(4)),
        ValueError,
        r"`w` must have rank >= 2",
    ),
    "weightnorm-scalar": (
        lambda: bnjax.weightnorm_init(jnp.ones(())),
        ValueError,
        r"`kernel` must have rank >= 1",
    ),
    "spectral-axis": (
        lambda: bnjax.spectralnorm_apply(STATE, K, True, axis=4),
        ValueError,
        r"`axis` must be in \[-4, 4\).*got 4",
    ),
    "spectral-init-axis": (
        lambda: bnjax.spectralnorm_init(K.shape, jax.random.key(0), axis=-5),
        ValueError,
        r"`axis` must be in \[-4, 4\).*got -5",
    ),
    "weightnorm-axis": (
        lambda: bnjax.weightnorm_apply(WN, K, axis=7),
        ValueError,
        r"`axis` must be in \[-4, 4\).*got 7",
    ),
    "weightnorm-init-axis": (
        lambda: bnjax.weightnorm_init(K, axis=4),
        ValueError,
        r"`axis` must be in",
    ),
    "standardize-axis": (
        lambda: bnjax.weight_standardize(K, axis=-5),
        ValueError,
        r"`axis` must be in",
    ),
    "axis-tuple": (
        lambda: bnjax.weight_standardize(K, axis=(0, 1)),
        TypeError,
        r"`axis` must be a single int \(the output axis\)",
    ),
    "spectral-epsilon": (
        lambda: bnjax.spectralnorm_apply(STATE, K, True, epsilon=0.0),
        ValueError,
        r"`epsilon` must be > 0, got 0.0",
    ),
    "weightnorm-epsilon": (
        lambda: bnjax.weightnorm_apply(WN, K, epsilon=-1e-12),
        ValueError,
        r"`epsilon` must be > 0",
    ),
    "standardize-epsilon": (
        lambda: bnjax.weight_standardize(K, epsilon=0),
        ValueError,
        r"`epsilon` must be > 0",
    ),
    "weightnorm-factory-epsilon": (
        lambda: bnjax.weightnorm(epsilon=0.0),
        ValueError,
        r"`epsilon` must be > 0",
    ),
    "spectral-factory-epsilon": (
        lambda: bnjax.spectralnorm(epsilon=-1.0),
        ValueError,
        r"`epsilon` must be > 0",
    ),
    "num-iterations": (
        lambda: bnjax.spectralnorm_apply(STATE, K, True, num_iterations=0),
        ValueError,
        r"`num_iterations` must be a positive int, got 0",
    ),
    "factory-num-iterations": (
        lambda: bnjax.spectralnorm(num_iterations=1.5),
        ValueError,
        r"`num_iterations` must be a positive int",
    ),
    "traced-train": (
        lambda: jax.jit(bnjax.spectralnorm_apply)(STATE, K, True),
        TypeError,
        r"`train` must be a Python bool, got a traced value.*static",
    ),
    "factory-traced-train": (
        lambda: jax.jit(bnjax.weightnorm().apply)(WN, None, K, True),
        TypeError,
        r"`train` must be a Python bool, got a traced value.*static",
    ),
    "spectral-int-kernel": (
        lambda: bnjax.spectralnorm_apply(STATE, K.astype(jnp.int32), True),
        TypeError,
        r"`w` must have a floating dtype, got int32",
    ),
    "weightnorm-bool-kernel": (
        lambda: bnjax.weightnorm_apply(WN, K.astype(bool)),
        TypeError,
        r"`v` must have a floating dtype, got bool",
    ),
    "weightnorm-init-int-kernel": (
        lambda: bnjax.weightnorm_init(K.astype(jnp.int8)),
        TypeError,
        r"`kernel` must have a floating dtype, got int8",
    ),
    "standardize-int-kernel": (
        lambda: bnjax.weight_standardize(K.astype(jnp.uint8)),
        TypeError,
        r"`w` must have a floating dtype, got uint8",
    ),
    "spectral-state-shape": (
        lambda: bnjax.spectralnorm_apply(STATE, jnp.ones((3, 3, 3, 4)), True),
        ValueError,
        r"`state.v` must have shape \(27,\) to match the kernel `w`.*got \(18,\)",
    ),
    "spectral-state-axis": (
        lambda: bnjax.spectralnorm_apply(STATE, K, False, axis=0),
        ValueError,
        r"`state.u` must have shape \(3,\).*output axis 0, got \(4,\)",
    ),
    "weightnorm-scale-shape": (
        lambda: bnjax.weightnorm_apply(WN, jnp.ones((3, 5))),
        ValueError,
        r"`params.scale` must have shape \(5,\).*got \(4,\)",
    ),
    "weightnorm-no-scale": (
        lambda: bnjax.weightnorm_apply(bnjax.NormParams(None, None), K),
        ValueError,
        r"`params.scale` must be an array, got None",
    ),
    "spectral-factory-no-key": (
        lambda: bnjax.spectralnorm().init(K),
        ValueError,
        r"`key` must be a `jax.random` key",
    ),
    "convert-missing-key": (
        lambda: convert.from_torch_spectralnorm({"weight": np.ones((4, 2))}),
        ValueError,
        r"`state_dict` must hold `parametrizations.weight.original`",
    ),
    "convert-weightnorm-dim": (
        lambda: convert.from_torch_weightnorm(
            {
                "parametrizations.weight.original0": np.ones((1, 3)),
                "parametrizations.weight.original1": np.ones((4, 3)),
            }
        ),
        ValueError,
        r"one value per output.*Only `dim=0`",
    ),
}


@pytest.mark.parametrize("call, error, message", list(ERRORS.values()), ids=list(ERRORS))
def test_bad_input_raises_at_trace_time_with_a_clear_message(call, error, message):
    with pytest.raises(error, match=message):
        call()
