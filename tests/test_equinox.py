"""bnjax.equinox: Equinox modules over the functions, called per example.

Mapped over a batch with `jax.vmap(axis_name=...)`, they compute what the
functions compute on the whole batch; where Equinox's own layers share
bnjax's conventions they agree with them; they work under Equinox's
transforms and with bnjax's tools through Equinox's partitioning.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bnjax
from bnjax import equinox as beqx
from tests.helpers import f64, random_input, random_mask, random_params
from tests.tolerances import SYNC_TOL, TOL

F32 = TOL["float32"]


@eqx.filter_jit
def _mapped(layer, x, state=None):
    """`layer` applied to every example of `x`, its batch statistics pooled over the batch."""
    if state is None:
        return jax.vmap(layer)(x)
    return jax.vmap(layer, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)


def _with_params(layer, seed=0):
    params = random_params(np.random.default_rng(seed), np.shape(layer.params.scale))
    return eqx.tree_at(lambda m: m.params, layer, params)


# (layer, the same normalizer as a function of the whole batch, batch shape)
BATCH_CASES = {
    "batchnorm-nchw": (
        lambda: beqx.BatchNorm(4, axis_name="batch", momentum=0.8),
        bnjax.batchnorm(axis=1, momentum=0.8),
        (6, 4, 3, 2),
    ),
    "batchnorm-nhwc": (
        lambda: beqx.BatchNorm(4, axis_name="batch", axis=-1),
        bnjax.batchnorm(),
        (6, 3, 2, 4),
    ),
    "batchnorm-warmup": (
        lambda: beqx.BatchNorm(4, axis_name="batch", momentum_warmup=True),
        bnjax.batchnorm(axis=1, momentum_warmup=True),
        (8, 4),
    ),
    "batchrenorm": (
        lambda: beqx.BatchRenorm(4, axis_name="batch", r_max=1.5, d_max=0.5),
        bnjax.batchrenorm(axis=1, r_max=1.5, d_max=0.5),
        (6, 4, 3),
    ),
}


@pytest.mark.parametrize("name", BATCH_CASES)
def test_mapped_batch_layer_equals_the_function_on_the_whole_batch(name):
    make, normalizer, shape = BATCH_CASES[name]
    layer, state = eqx.nn.make_with_state(make)()
    layer = _with_params(layer)
    expected_state = normalizer.init(shape)[1]
    rng = np.random.default_rng(1)
    for step in range(3):
        x = random_input(rng, shape) + step
        y, state = _mapped(layer, x, state)
        expected, expected_state = normalizer.apply(layer.params, expected_state, x, True)
        np.testing.assert_allclose(y, expected, **SYNC_TOL, err_msg=f"step {step}")
        got = state.get(layer.state_index)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **SYNC_TOL), got, expected_state)
    x = random_input(rng, shape)
    y, eval_state = _mapped(eqx.nn.inference_mode(layer), x, state)
    np.testing.assert_allclose(
        y, normalizer.apply(layer.params, expected_state, x, False)[0], **F32
    )
    jax.tree.map(np.testing.assert_array_equal, eval_state.get(layer.state_index), got)


STATELESS_CASES = {
    "layernorm": (lambda: beqx.LayerNorm(4), bnjax.layernorm(), (6, 3, 4)),
    "layernorm-2d": (lambda: beqx.LayerNorm((3, 4)), bnjax.layernorm(axis=(1, 2)), (6, 3, 4)),
    "rmsnorm": (lambda: beqx.RMSNorm(4, epsilon=1e-3), bnjax.rmsnorm(epsilon=1e-3), (6, 3, 4)),
    "groupnorm": (
        lambda: beqx.GroupNorm(4, num_groups=2),
        bnjax.groupnorm(num_groups=2, axis=1),
        (5, 4, 3, 2),
    ),
    "instancenorm": (lambda: beqx.InstanceNorm(4), bnjax.instancenorm(axis=1), (5, 4, 3, 2)),
}


@pytest.mark.parametrize("name", STATELESS_CASES)
def test_mapped_stateless_layer_equals_the_function_bit_for_bit(name):
    make, normalizer, shape = STATELESS_CASES[name]
    layer = _with_params(make())
    x = random_input(np.random.default_rng(2), shape)
    expected, _ = jax.jit(normalizer.apply, static_argnums=3)(layer.params, None, x, True)
    np.testing.assert_array_equal(_mapped(layer, x), expected)


def test_mask_and_modulation_are_per_example():
    layer, state = eqx.nn.make_with_state(beqx.BatchNorm)(4, axis_name="batch", axis=-1)
    rng = np.random.default_rng(3)
    x = random_input(rng, (6, 5, 4))
    mask = random_mask(rng, (6, 5))
    modulation = (random_input(rng, (6, 1, 4)), random_input(rng, (6, 1, 4)))
    call = lambda x, mask, modulation, state: layer(x, state, mask=mask, modulation=modulation)  # noqa: E731
    mapped = jax.vmap(call, (0, 0, 0, None), (0, None), axis_name="batch")
    y, _ = jax.jit(mapped)(x, mask, modulation, state)
    expected, _ = bnjax.batchnorm_apply(
        layer.params, state.get(layer.state_index), x, True, mask=mask, modulation=modulation
    )
    np.testing.assert_allclose(y, expected, **SYNC_TOL)


def test_agrees_with_equinox_batchnorm_in_batch_mode_in_training():
    # Equinox's mode="batch" normalizes with the batch's statistics and keeps
    # bnjax's moving average (from mean 0, var 1) as its hidden state; only its
    # eval mode differs: it divides that average by 1 - momentum**count.
    # (mode="ema" normalizes training batches with the running average.)
    theirs, their_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        4, axis_name="batch", momentum=0.8, mode="batch"
    )
    ours, our_state = eqx.nn.make_with_state(beqx.BatchNorm)(4, axis_name="batch", momentum=0.8)
    rng = np.random.default_rng(4)
    for step in range(3):
        x = random_input(rng, (8, 4, 3, 3)) * (step + 1)
        y, our_state = _mapped(ours, x, our_state)
        expected, their_state = _mapped(theirs, x, their_state)
        np.testing.assert_allclose(y, expected, **F32, err_msg=f"step {step}")
        running = our_state.get(ours.state_index)
        for got, want in zip(running[:2], their_state.get(theirs.batch_state_index), strict=True):
            np.testing.assert_allclose(got, want, **F32)


EQUINOX_STATELESS = {
    "layernorm": (eqx.nn.LayerNorm(4, eps=1e-5), beqx.LayerNorm(4), (6, 4)),
    "rmsnorm": (eqx.nn.RMSNorm(4, eps=1e-6), beqx.RMSNorm(4), (6, 4)),
    "groupnorm": (eqx.nn.GroupNorm(2, 4, eps=1e-5), beqx.GroupNorm(4, num_groups=2), (5, 4, 3, 2)),
}


@pytest.mark.parametrize("name", EQUINOX_STATELESS)
def test_agrees_with_equinox_stateless_layers(name):
    theirs, ours, shape = EQUINOX_STATELESS[name]
    x = random_input(np.random.default_rng(5), shape)
    np.testing.assert_allclose(_mapped(ours, x), jax.vmap(theirs)(x), **F32)


class _Net(eqx.Module):
    """Conv -> BatchNorm -> relu -> mean over space -> Linear -> LayerNorm, per example."""

    conv: eqx.nn.Conv2d
    bn: beqx.BatchNorm
    linear: eqx.nn.Linear
    ln: beqx.LayerNorm

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1)
        self.bn = beqx.BatchNorm(4, axis_name="batch")
        self.linear = eqx.nn.Linear(4, 3, key=k2)
        self.ln = beqx.LayerNorm(3)

    def __call__(self, x, state):
        z, state = self.bn(self.conv(x), state)
        return self.ln(self.linear(jax.nn.relu(z).mean((1, 2)))), state


def _net_and_batch(n=6):
    model, state = eqx.nn.make_with_state(_Net)(jax.random.key(0))
    return model, state, jnp.asarray(random_input(np.random.default_rng(6), (n, 2, 5, 5)))


def test_filter_jit_and_filter_grad_equal_the_functional_model():
    model, state, x = _net_and_batch()

    @eqx.filter_jit
    def loss(model, state, x):
        y, state = _mapped(model, x, state)
        return jnp.sum(jnp.sin(y)), state

    (value, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state, x)

    def functional(bn_params, ln_params):
        z = jax.vmap(model.conv)(x)
        z, stats = bnjax.batchnorm_apply(bn_params, bnjax.batchnorm_init(4)[1], z, True, axis=1)
        z = jax.vmap(model.linear)(jax.nn.relu(z).mean((2, 3)))
        return jnp.sum(jnp.sin(bnjax.layernorm_apply(ln_params, z))), stats

    (expected, stats), expected_grads = jax.jit(
        jax.value_and_grad(functional, (0, 1), has_aux=True)
    )(model.bn.params, model.ln.params)
    np.testing.assert_allclose(value, expected, **SYNC_TOL)
    for got, want in zip((grads.bn.params, grads.ln.params), expected_grads, strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **SYNC_TOL), got, want)
    got = new_state.get(model.bn.state_index)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **SYNC_TOL), got, stats)


def test_equally_configured_models_share_one_compilation():
    traces = []

    @eqx.filter_jit
    def forward(model, state, x):
        traces.append(None)
        return jax.vmap(model, (0, None), (0, None), axis_name="batch")(x, state)

    for _ in range(2):
        model, state, x = _net_and_batch()
        forward(model, state, x)
    assert len(traces) == 1


def test_sequential_calls_the_batch_layer_with_state():
    conv = eqx.nn.Conv2d(2, 4, 3, key=jax.random.key(1))
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [conv, beqx.BatchNorm(4, axis_name="batch"), eqx.nn.Lambda(jax.nn.relu)]
    )
    x = random_input(np.random.default_rng(7), (5, 2, 4, 4))
    y, state = _mapped(seq, x, state)
    z = jax.vmap(conv)(x)
    expected, _ = bnjax.batchnorm_apply(
        bnjax.batchnorm_init(4)[0], bnjax.batchnorm_init(4)[1], z, True, axis=1
    )
    np.testing.assert_allclose(y, jax.nn.relu(expected), **SYNC_TOL)
    assert int(state.get(seq.layers[1].state_index).count) == 1


def test_precise_batch_stats_runs_on_equinox_state():
    model, state, _ = _net_and_batch()
    batches = [
        jnp.asarray(random_input(np.random.default_rng(s), (n, 2, 5, 5)))
        for s, n in [(8, 6), (9, 3)]
    ]
    stats_fn = lambda state, batch: _mapped(model, batch, state)[1]  # noqa: E731
    state = bnjax.precise_batch_stats(stats_fn, state, batches)
    inputs = np.concatenate([f64(jax.vmap(model.conv)(b)) for b in batches])
    stats = state.get(model.bn.state_index)
    np.testing.assert_allclose(stats.mean, inputs.mean((0, 2, 3)), **F32)
    np.testing.assert_allclose(stats.var, inputs.var((0, 2, 3)), **F32)
    assert int(stats.count) == 0


def test_weight_decay_mask_works_on_the_partitioned_model():
    model, _, _ = _net_and_batch()
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    mask = bnjax.weight_decay_mask(params)
    assert mask.bn.params == bnjax.NormParams(False, False)
    assert mask.ln.params == bnjax.NormParams(False, False)
    assert mask.conv.weight is True and mask.linear.weight is True


def test_folding_into_an_equinox_conv():
    model, state, x = _net_and_batch()
    _, state = _mapped(model, x, state)
    stats = state.get(model.bn.state_index)
    # Equinox's kernels are OIHW; folding takes the output channels last.
    kernel, bias = bnjax.fold_batchnorm_after(
        jnp.moveaxis(model.conv.weight, 0, -1), model.conv.bias[:, 0, 0], model.bn.params, stats
    )
    folded = eqx.tree_at(
        lambda c: (c.weight, c.bias), model.conv, (jnp.moveaxis(kernel, -1, 0), bias[:, None, None])
    )
    expected, _ = _mapped(eqx.nn.inference_mode(model.bn), jax.vmap(model.conv)(x), state)
    np.testing.assert_allclose(jax.vmap(folded)(x), expected, **F32)


def test_torch_batchnorm_loads_into_the_layer_and_its_state():
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3) * 2 + 1)
    theirs.eval()
    params, stats = bnjax.convert.from_torch_batchnorm(theirs.state_dict())
    layer, state = eqx.nn.make_with_state(beqx.BatchNorm)(4, axis_name="batch", inference=True)
    layer = eqx.tree_at(lambda m: m.params, layer, params)
    state = state.set(layer.state_index, stats)
    x = random_input(np.random.default_rng(10), (5, 4, 3, 3))
    np.testing.assert_allclose(
        _mapped(layer, x, state)[0], theirs(torch.from_numpy(x)).detach().numpy(), **F32
    )


def test_eval_mode_leaves_the_callers_state_usable():
    layer, state = eqx.nn.make_with_state(beqx.BatchNorm)(3, axis_name="batch", inference=True)
    x = jnp.asarray(random_input(np.random.default_rng(11), (3, 4, 4)))
    first, same = layer(x, state)
    second, _ = layer(x, state)  # Equinox refuses a state that `set` has replaced
    np.testing.assert_array_equal(first, second)
    assert same is state


def test_hyperparameters_are_checked_at_construction():
    with pytest.raises(ValueError, match="num_groups"):
        beqx.GroupNorm(6, num_groups=4)
    with pytest.raises(ValueError, match="epsilon"):
        beqx.BatchNorm(4, axis_name="batch", epsilon=0.0)
    with pytest.raises(TypeError, match="axis_name"):
        beqx.BatchNorm(4)  # per-example batch statistics need the mapped axis


def test_batch_layer_outside_its_mapped_axis_is_an_error():
    layer, state = eqx.nn.make_with_state(beqx.BatchNorm)(4, axis_name="batch")
    with pytest.raises(ValueError, match="batch"):
        jax.vmap(layer, in_axes=(0, None), out_axes=(0, None))(jnp.ones((3, 4)), state)


def test_bad_axis_and_modulation_get_the_functions_errors():
    with pytest.raises(TypeError, match="`axis` must be an int or a tuple of ints, got None"):
        beqx.LayerNorm(4, axis=None)
    with pytest.raises(TypeError, match="modulation"):
        beqx.LayerNorm(4)(jnp.ones(4), modulation=jnp.ones(4))
