"""Converters to and from PyTorch, Flax linen, Haiku and Keras.

Each framework's own layer, fed converted values, is the reference: eval
outputs must agree, and continued PyTorch training must match bnjax's
PyTorch-compatible mode step for step. Round trips must be bit-exact.
"""

import functools

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax import convert
from tests.tolerances import TOL

# Continued training: outputs, parameters and running statistics after a
# few float32 SGD steps in PyTorch and in bnjax. Each step's values carry
# float32 rounding from reductions over ~100 entries (~1e-6 at worst, see
# TOL), and the parameter updates carry it into the next step; five steps
# with a learning rate of 0.1 do not grow it by more than a few ulps more
# (observed: <= 2.4e-7). The unbiased correction that PyTorch-compatible
# mode adds, n / (n - 1) = 1.0125 for n = 80, moves the running variance by
# ~1e-3, far outside this tolerance.
TRAIN_TOL = {"rtol": 1e-5, "atol": 1e-5}

TORCH_BATCHNORMS = {
    "1d": ("BatchNorm1d", (6, 3, 5)),
    "2d": ("BatchNorm2d", (4, 3, 4, 5)),
    "3d": ("BatchNorm3d", (2, 3, 3, 4, 2)),
}


def _randomize(module, seed):
    """Non-trivial parameters and running statistics for a torch norm layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name == "num_batches_tracked":
                tensor.fill_(11)
            elif name == "running_var":
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
    return module


def _sgd_steps(module, batches, targets, lr=0.1):
    """Trains `module` in training mode with SGD on a squared error."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    module.train()
    outputs = []
    for x, target in zip(batches, targets, strict=True):
        optimizer.zero_grad()
        y = module(torch.from_numpy(x))
        loss = ((y - torch.from_numpy(target)) ** 2).mean()
        loss.backward()
        optimizer.step()
        outputs.append(y.detach().numpy())
    return outputs


def _data(rng, shape, num):
    batches = [(rng.normal(size=shape) * 2 + 1).astype(np.float32) for _ in range(num)]
    targets = [rng.normal(size=shape).astype(np.float32) for _ in range(num)]
    return batches, targets


# --- PyTorch BatchNorm ---------------------------------------------------------


@pytest.mark.parametrize("kind", TORCH_BATCHNORMS)
def test_trained_torch_batchnorm_gives_same_eval_outputs_in_bnjax(kind):
    name, shape = TORCH_BATCHNORMS[kind]
    rng = np.random.default_rng(0)
    module = _randomize(getattr(torch.nn, name)(shape[1]), 0)
    _sgd_steps(module, *_data(rng, shape, 3))
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)

    module.eval()
    expected = module(torch.from_numpy(x)).detach().numpy()
    params, state = convert.from_torch_batchnorm(module.state_dict())
    y, _ = bnjax.batchnorm_apply(params, state, jnp.asarray(x), False, axis=1)

    np.testing.assert_allclose(y, expected, **TOL["float32"])


def _bnjax_sgd_steps(params, state, batches, targets, *, momentum, lr=0.1, **kwargs):
    """bnjax's counterpart of `_sgd_steps`, in PyTorch-compatible mode."""
    optimizer = optax.sgd(lr)
    apply = functools.partial(bnjax.batchnorm_apply, axis=1, momentum=momentum, **kwargs)

    def loss_fn(params, state, x, target):
        y, new_state = apply(params, state, x, True)
        return jnp.mean((y - target) ** 2), (y, new_state)

    @jax.jit
    def step(params, state, opt_state, x, target):
        grads, (y, state) = jax.grad(loss_fn, has_aux=True)(params, state, x, target)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), state, opt_state, y

    opt_state = optimizer.init(params)
    outputs = []
    for x, target in zip(batches, targets, strict=True):
        params, state, opt_state, y = step(params, state, opt_state, x, target)
        outputs.append(y)
    return params, state, outputs


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])
def test_training_continued_in_pytorch_compatible_mode_matches_torch(torch_momentum):
    rng = np.random.default_rng(1)
    shape = TORCH_BATCHNORMS["2d"][1]
    module = _randomize(torch.nn.BatchNorm2d(shape[1], momentum=torch_momentum), 1)
    _sgd_steps(module, *_data(rng, shape, 2))
    params, state = convert.from_torch_batchnorm(module.state_dict())
    batches, targets = _data(rng, shape, 5)

    torch_outputs = _sgd_steps(module, batches, targets)
    params, state, outputs = _bnjax_sgd_steps(
        params,
        state,
        batches,
        targets,
        momentum=convert.from_torch_momentum(torch_momentum),
        unbiased_running_var=True,
    )

    for y, expected in zip(outputs, torch_outputs, strict=True):
        np.testing.assert_allclose(y, expected, **TRAIN_TOL)
    expected = module.state_dict()
    np.testing.assert_allclose(params.scale, expected["weight"].numpy(), **TRAIN_TOL)
    np.testing.assert_allclose(params.bias, expected["bias"].numpy(), **TRAIN_TOL)
    np.testing.assert_allclose(state.mean, expected["running_mean"].numpy(), **TRAIN_TOL)
    np.testing.assert_allclose(state.var, expected["running_var"].numpy(), **TRAIN_TOL)
    assert int(state.count) == int(expected["num_batches_tracked"]) == 11 + 2 + 5


def test_default_biased_running_var_does_not_match_torch():
    """The check above can tell the two modes apart."""
    rng = np.random.default_rng(2)
    shape = TORCH_BATCHNORMS["2d"][1]
    module = torch.nn.BatchNorm2d(shape[1])
    params, state = convert.from_torch_batchnorm(module.state_dict())
    batches, targets = _data(rng, shape, 1)

    _sgd_steps(module, batches, targets)
    _, state, _ = _bnjax_sgd_steps(params, state, batches, targets, momentum=0.9)

    difference = np.abs(np.asarray(state.var) - module.running_var.numpy())
    assert difference.max() > 10 * TRAIN_TOL["atol"]


def test_unbiased_running_var_counts_entries_across_axis_name_and_mask():
    rng = np.random.default_rng(3)
    num_devices = jax.device_count()
    x = rng.normal(size=(2 * num_devices, 3, 3)).astype(np.float32)
    mask = rng.uniform(size=(2 * num_devices, 1)) < 0.6
    mesh = jax.make_mesh((num_devices,), ("data",))
    params, state = bnjax.batchnorm_init(3)

    def per_device(x, mask):
        return bnjax.batchnorm_apply(
            params, state, x, True, axis_name="data", mask=mask, unbiased_running_var=True
        )[1]

    fn = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    )
    split = NamedSharding(mesh, P("data"))
    new_state = fn(jax.device_put(x, split), jax.device_put(mask, split))

    values = x[np.broadcast_to(mask, x.shape[:2])].astype(np.float64)  # (n, C)
    unbiased = np.var(values, axis=0, ddof=1)
    np.testing.assert_allclose(new_state.var, 0.9 + 0.1 * unbiased, **TOL["float32"])


def test_torch_batchnorm_state_dict_round_trip_is_bit_exact():
    module = _randomize(torch.nn.BatchNorm2d(5), 4)
    original = module.state_dict()

    params, state = convert.from_torch_batchnorm(original)
    back = convert.to_torch_batchnorm(params, state)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})

    assert back.keys() == original.keys()
    for key, value in back.items():
        assert value.dtype == original[key].numpy().dtype
        np.testing.assert_array_equal(value, original[key].numpy())


def test_torch_batchnorm_without_affine_converts_to_none_fields_and_back():
    module = _randomize(torch.nn.BatchNorm1d(4, affine=False), 5)

    params, state = convert.from_torch_batchnorm(module.state_dict())

    assert params == bnjax.NormParams(None, None)
    assert sorted(convert.to_torch_batchnorm(params, state)) == sorted(module.state_dict())


def test_torch_batchnorm_with_prefix_reads_one_layer_of_a_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), _randomize(torch.nn.BatchNorm2d(3), 6))

    _, state = convert.from_torch_batchnorm(model.state_dict(), prefix="1.")

    np.testing.assert_array_equal(state.mean, model[1].running_mean.numpy())
    assert set(convert.to_torch_batchnorm(*bnjax.batchnorm_init(3), prefix="1.")) <= set(
        model.state_dict()
    )


def test_torch_batchnorm_without_running_stats_is_refused():
    module = torch.nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert.from_torch_batchnorm(module.state_dict())


def test_momentum_helpers_convert_both_ways():
    assert convert.from_torch_momentum(0.1) == pytest.approx(0.9)
    assert convert.to_torch_momentum(0.99) == pytest.approx(0.01)
    assert convert.from_torch_momentum(None) is None and convert.to_torch_momentum(None) is None


# --- PyTorch LayerNorm and GroupNorm -------------------------------------------


def test_torch_layernorm_gives_same_outputs_and_round_trips():
    module = _randomize(torch.nn.LayerNorm((4, 5)), 7)
    x = np.random.default_rng(8).normal(size=(3, 2, 4, 5)).astype(np.float32)

    params = convert.from_torch_layernorm(module.state_dict())
    y = bnjax.layernorm_apply(params, jnp.asarray(x), axis=(-2, -1))

    expected = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    back = convert.to_torch_layernorm(params)
    assert back.keys() == module.state_dict().keys()
    for key, value in back.items():
        np.testing.assert_array_equal(value, module.state_dict()[key].numpy())


def test_torch_layernorm_without_bias_has_none_bias():
    module = torch.nn.LayerNorm(6, bias=False)
    params = convert.from_torch_layernorm(module.state_dict())
    assert params.bias is None and params.scale.shape == (6,)
    assert sorted(convert.to_torch_layernorm(params)) == ["weight"]


def test_torch_groupnorm_gives_same_outputs_and_round_trips():
    module = _randomize(torch.nn.GroupNorm(3, 6), 9)
    x = np.random.default_rng(10).normal(size=(2, 6, 4, 3)).astype(np.float32)

    params = convert.from_torch_groupnorm(module.state_dict())
    y = bnjax.groupnorm_apply(params, jnp.asarray(x), num_groups=3, axis=1)

    expected = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    back = convert.to_torch_groupnorm(params)
    assert back.keys() == module.state_dict().keys()
    for key, value in back.items():
        np.testing.assert_array_equal(value, module.state_dict()[key].numpy())


@pytest.mark.parametrize("normalized_shape", [(6,), (4, 5)], ids=["last-1", "last-2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_torch_rmsnorm_gives_same_outputs_and_round_trips_bit_exact(normalized_shape, dtype):
    module = _randomize(torch.nn.RMSNorm(normalized_shape, eps=1e-6), 11).to(dtype)
    x = np.random.default_rng(12).normal(size=(3, 2, *normalized_shape)).astype(np.float32)

    params = convert.from_torch_rmsnorm(module.state_dict())
    assert params.bias is None
    y = bnjax.rmsnorm_apply(
        params, jnp.asarray(x), axis=tuple(range(-len(normalized_shape), 0)), epsilon=1e-6
    )

    expected = module.float()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    back = convert.to_torch_rmsnorm(params)
    assert back.keys() == module.state_dict().keys()
    for key, value in back.items():
        original = module.to(dtype).state_dict()[key]
        assert str(value.dtype) == str(original.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(value.astype(np.float32), original.float().numpy())


def test_torch_rmsnorm_without_weight_converts_to_no_scale_and_back():
    module = torch.nn.RMSNorm(6, elementwise_affine=False)
    params = convert.from_torch_rmsnorm(module.state_dict())
    assert params == bnjax.NormParams(None, None)
    assert convert.to_torch_rmsnorm(params) == {}


def test_to_torch_rmsnorm_refuses_a_bias():
    with pytest.raises(ValueError, match="`params.bias` must be None"):
        convert.to_torch_rmsnorm(bnjax.layernorm_init(6))


def test_zero_centered_torch_weight_loads_as_a_zero_centered_scale():
    # Transformer Engine's RMSNorm(zero_centered_gamma=True) stores `weight`
    # as g and computes rms_norm(x) * (1 + g); its state dict has PyTorch's keys.
    g = torch.tensor(np.random.default_rng(13).normal(size=6) * 0.1, dtype=torch.float32)
    x = np.random.default_rng(14).normal(size=(5, 6)).astype(np.float32)
    expected = F.rms_norm(torch.from_numpy(x), (6,), 1 + g, eps=1e-6).numpy()

    params = convert.from_torch_rmsnorm({"weight": g})
    y = bnjax.rmsnorm_apply(params, jnp.asarray(x), zero_centered_scale=True)
    np.testing.assert_allclose(y, expected, **TOL["float32"])
    np.testing.assert_array_equal(convert.to_torch_rmsnorm(params)["weight"], g.numpy())


# --- Flax, Haiku, Keras -----------------------------------------------------


def _bnjax_layer(seed, c=4, **init_kwargs):
    """bnjax params and state with non-trivial values."""
    rng = np.random.default_rng(seed)
    params, state = bnjax.batchnorm_init(c, **init_kwargs)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
    state = bnjax.BatchStats(
        jnp.asarray(rng.normal(size=c), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        jnp.int32(9),
    )
    return params, state


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def _eval_input(seed, shape=(5, 3, 4)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2 + 1, jnp.float32)


def test_flax_batchnorm_fed_converted_variables_gives_bnjax_eval_outputs():
    params, state = _bnjax_layer(11)
    x = _eval_input(12)

    expected = nn.BatchNorm(use_running_average=True).apply(
        convert.to_flax_batchnorm(params, state), x
    )
    y, _ = bnjax.batchnorm_apply(params, state, x, False)

    np.testing.assert_allclose(y, expected, **TOL["float32"])


@pytest.mark.parametrize("use_scale", [True, False], ids=["scale", "no-scale"])
def test_flax_round_trips_are_identical(use_scale):
    variables = nn.BatchNorm(use_running_average=False, use_scale=use_scale).init(
        jax.random.key(0), _eval_input(13)
    )
    variables = jax.tree.map(lambda a: a + 0.25, variables)
    params, state = _bnjax_layer(14, use_scale=use_scale)

    _assert_identical(convert.to_flax_batchnorm(*convert.from_flax_batchnorm(variables)), variables)
    _assert_identical(
        convert.from_flax_batchnorm(convert.to_flax_batchnorm(params, state), count=9),
        (params, state),
    )


def _haiku_batchnorm(decay_rate=0.9):

    def forward(x, is_training):
        return hk.BatchNorm(True, True, decay_rate, eps=1e-5)(x, is_training)

    return hk.transform_with_state(forward)


def test_haiku_batchnorm_fed_converted_state_gives_bnjax_eval_outputs():
    forward = _haiku_batchnorm()
    params, state = _bnjax_layer(15)
    x = _eval_input(16, (5, 2, 4))

    hk_params, hk_state = convert.to_haiku_batchnorm(params, state, decay_rate=0.9, ndim=3)
    template = forward.init(jax.random.key(0), x, True)
    expected, _ = forward.apply(hk_params, hk_state, None, x, False)
    y, _ = bnjax.batchnorm_apply(params, state, x, False)

    assert jax.tree.map(jnp.shape, template) == jax.tree.map(jnp.shape, (hk_params, hk_state))
    np.testing.assert_allclose(y, expected, **TOL["float32"])


def test_haiku_round_trips_keep_every_stored_value():
    forward = _haiku_batchnorm(decay_rate=0.8)
    x = _eval_input(17)
    hk_params, hk_state = forward.init(jax.random.key(0), x, True)
    for seed in range(3):  # a state Haiku trained itself, counter 3
        _, hk_state = forward.apply(hk_params, hk_state, None, _eval_input(seed), True)
    params, state = _bnjax_layer(18)

    back_params, back_state = convert.to_haiku_batchnorm(
        *convert.from_haiku_batchnorm(hk_params, hk_state), decay_rate=0.8, ndim=3
    )
    _assert_identical(back_params, hk_params)
    for ema in hk_state:
        for key in ("average", "counter"):
            np.testing.assert_array_equal(back_state[ema][key], hk_state[ema][key])
        # hidden is recomputed from average: one rounding away.
        np.testing.assert_allclose(back_state[ema]["hidden"], hk_state[ema]["hidden"], rtol=1e-6)
    _assert_identical(
        convert.from_haiku_batchnorm(
            *convert.to_haiku_batchnorm(params, state, decay_rate=0.8, ndim=4)
        ),
        (params, state),
    )


def test_keras_round_trips_are_identical():
    params, state = _bnjax_layer(19)
    weights = convert.to_keras_batchnorm(params, state)

    _assert_identical(convert.from_keras_batchnorm(weights, count=9), (params, state))
    named = dict(zip(["gamma", "beta", "moving_mean", "moving_variance"], weights, strict=True))
    _assert_identical(convert.from_keras_batchnorm(named, count=9), (params, state))
    no_scale = bnjax.NormParams(None, params.bias)
    assert len(convert.to_keras_batchnorm(no_scale, state)) == 3
    with pytest.raises(ValueError, match="mapping|4 arrays"):
        convert.from_keras_batchnorm(convert.to_keras_batchnorm(no_scale, state))


def test_keras_batchnorm_with_converted_weights_gives_bnjax_eval_outputs(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    import keras  # imported here: it reads KERAS_BACKEND once, at import

    assert keras.backend.backend() == "jax", "keras was imported before with another backend"
    params, state = _bnjax_layer(20)
    x = _eval_input(21)

    layer = keras.layers.BatchNormalization()  # epsilon 1e-3
    layer.build(x.shape)
    layer.set_weights(convert.to_keras_batchnorm(params, state))
    expected = layer(x, training=False)
    y, _ = bnjax.batchnorm_apply(params, state, x, False, epsilon=1e-3)

    np.testing.assert_allclose(y, np.asarray(expected), **TOL["float32"])
    _assert_identical(
        convert.from_keras_batchnorm({w.path: np.asarray(w.value) for w in layer.weights}, count=9),
        (params, state),
    )
