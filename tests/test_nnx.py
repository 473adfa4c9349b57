"""bnjax.nnx: Flax NNX modules over the functions.

Their numbers are the functions' numbers bit for bit; where Flax's own layers
share bnjax's conventions they agree with them to float32 rounding; they
work under NNX's transforms and with bnjax's tools.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import bnjax
from bnjax import nnx as bnnx
from tests.helpers import f64, random_input, random_mask, random_params
from tests.tolerances import SYNC_TOL, TOL

F32 = TOL["float32"]

# (adapter, its size argument, keywords, the matching factory, input shape)
LAYERS = {
    "batchnorm": (bnnx.BatchNorm, 4, {"momentum": 0.8}, bnjax.batchnorm, (6, 3, 4)),
    "batchnorm-nchw": (bnnx.BatchNorm, 4, {"axis": 1}, bnjax.batchnorm, (5, 4, 3, 2)),
    "batchnorm-ghost-warmup": (
        bnnx.BatchNorm,
        4,
        {"virtual_batch_size": 3, "momentum_warmup": True},
        bnjax.batchnorm,
        (6, 4),
    ),
    "batchrenorm": (bnnx.BatchRenorm, 4, {"r_max": 1.5, "d_max": 0.5}, bnjax.batchrenorm, (6, 4)),
    "layernorm": (bnnx.LayerNorm, 4, {}, bnjax.layernorm, (6, 3, 4)),
    "layernorm-2d": (bnnx.LayerNorm, (3, 4), {}, bnjax.layernorm, (6, 3, 4)),
    "rmsnorm": (bnnx.RMSNorm, 4, {"zero_centered_scale": True}, bnjax.rmsnorm, (6, 3, 4)),
    "groupnorm": (bnnx.GroupNorm, 4, {"num_groups": 2}, bnjax.groupnorm, (5, 3, 2, 4)),
    "instancenorm-nchw": (bnnx.InstanceNorm, 4, {"axis": 1}, bnjax.instancenorm, (5, 4, 3, 2)),
}
BATCH_LAYERS = [
    name for name, case in LAYERS.items() if case[3] in (bnjax.batchnorm, bnjax.batchrenorm)
]


def _layer_and_normalizer(name, seed=0):
    """The adapter with random params, the factory's Normalizer and those params."""
    cls, size, hyper, factory, shape = LAYERS[name]
    layer = cls(size, **hyper)
    if "layernorm-2d" == name:
        hyper = {**hyper, "axis": (-2, -1)}
    normalizer = factory(**hyper)
    params, state = normalizer.init(shape)
    rng = np.random.default_rng(seed)
    random = random_params(rng, np.shape(params.scale))
    params = bnjax.NormParams(random.scale, None if params.bias is None else random.bias)
    layer.load_params(params)
    return layer, normalizer, params, state, shape


@pytest.mark.parametrize("name", LAYERS)
def test_adapter_equals_the_functional_call_bit_for_bit_over_steps_and_in_eval(name):
    layer, normalizer, params, state, shape = _layer_and_normalizer(name)
    rng = np.random.default_rng(1)
    for step in range(3):
        x = random_input(rng, shape)
        y, state = normalizer.apply(params, state, x, True)
        np.testing.assert_array_equal(layer(x), y, err_msg=f"step {step}")
        if state is not None:
            jax.tree.map(np.testing.assert_array_equal, layer.stats, state)
    x = random_input(rng, shape)
    layer.eval()
    np.testing.assert_array_equal(layer(x), normalizer.apply(params, state, x, False)[0])
    if state is not None:
        jax.tree.map(np.testing.assert_array_equal, layer.stats, state)


@pytest.mark.parametrize("name", ["batchnorm", "groupnorm", "layernorm"])
def test_mask_and_modulation_reach_the_functional_call(name):
    layer, normalizer, params, state, shape = _layer_and_normalizer(name)
    rng = np.random.default_rng(2)
    x = random_input(rng, shape)
    mask = random_mask(rng, shape[:1])
    per_example = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    modulation = (random_input(rng, per_example), random_input(rng, per_example))
    expected, _ = normalizer.apply(params, state, x, True, mask=mask, modulation=modulation)
    np.testing.assert_array_equal(layer(x, mask=mask, modulation=modulation), expected)


def test_use_running_average_argument_overrides_the_attribute():
    layer, normalizer, params, state, shape = _layer_and_normalizer("batchnorm")
    x = random_input(np.random.default_rng(3), shape)
    np.testing.assert_array_equal(
        layer(x, use_running_average=True), normalizer.apply(params, state, x, False)[0]
    )
    assert int(layer.count[...]) == 0
    layer.eval()
    layer(x, use_running_average=False)
    assert int(layer.count[...]) == 1


def test_variables_have_the_names_and_types_spec_gives():
    bn = bnnx.BatchNorm(3, use_bias=False)
    assert isinstance(bn.scale, nnx.Param) and bn.bias is None
    assert all(isinstance(getattr(bn, n), nnx.BatchStat) for n in ("mean", "var", "count"))
    assert bn.count[...].dtype == jnp.int32
    params = nnx.state(bnnx.RMSNorm(3), nnx.Param)
    assert set(params) == {"scale"}


# Flax's own layers with bnjax's conventions: two-pass variance
# (use_fast_variance=False), the same momentum formula, explicit epsilon.
FLAX_MATCHES = {
    "batchnorm": (
        lambda: nnx.BatchNorm(
            4, momentum=0.8, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0)
        ),
        lambda: bnnx.BatchNorm(4, momentum=0.8),
        (6, 3, 4),
    ),
    "batchnorm-nchw": (
        lambda: nnx.BatchNorm(4, axis=1, use_fast_variance=False, momentum=0.9, rngs=nnx.Rngs(0)),
        lambda: bnnx.BatchNorm(4, axis=1),
        (5, 4, 3, 2),
    ),
    "layernorm": (
        lambda: nnx.LayerNorm(4, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0)),
        lambda: bnnx.LayerNorm(4),
        (6, 3, 4),
    ),
    "rmsnorm": (
        lambda: nnx.RMSNorm(4, epsilon=1e-6, rngs=nnx.Rngs(0)),
        lambda: bnnx.RMSNorm(4),
        (6, 3, 4),
    ),
    "groupnorm": (
        lambda: nnx.GroupNorm(
            4, num_groups=2, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0)
        ),
        lambda: bnnx.GroupNorm(4, num_groups=2),
        (5, 3, 2, 4),
    ),
}


@pytest.mark.parametrize("name", FLAX_MATCHES)
def test_agrees_with_flax_nnx_over_steps_and_in_eval(name):
    make_flax, make_ours, shape = FLAX_MATCHES[name]
    theirs, ours = make_flax(), make_ours()
    params = random_params(np.random.default_rng(4), (4,))
    ours.load_params(params if ours.bias is not None else params._replace(bias=None))
    theirs.scale[...] = params.scale
    if ours.bias is not None:
        theirs.bias[...] = params.bias
    rng = np.random.default_rng(5)
    for step in range(3):
        x = random_input(rng, shape)
        np.testing.assert_allclose(ours(x), theirs(x), **F32, err_msg=f"step {step}")
        if isinstance(ours, bnnx.BatchNorm):
            np.testing.assert_allclose(ours.mean[...], theirs.mean[...], **F32)
            np.testing.assert_allclose(ours.var[...], theirs.var[...], **F32)
    if isinstance(ours, bnnx.BatchNorm):
        ours.eval(), theirs.eval()
        x = random_input(rng, shape)
        np.testing.assert_allclose(ours(x), theirs(x), **F32)


class _Net(nnx.Module):
    """Dense -> BatchNorm -> relu -> Dense -> LayerNorm, the shape of a small model."""

    def __init__(self, *, axis_name=None):
        rngs = nnx.Rngs(0)
        self.dense1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = bnnx.BatchNorm(4, axis_name=axis_name)
        self.dense2 = nnx.Linear(4, 4, rngs=rngs)
        self.ln = bnnx.LayerNorm(4)

    def __call__(self, x):
        return self.ln(self.dense2(jax.nn.relu(self.bn(self.dense1(x)))))


def _net_functional(model, x, state):
    """_Net written with the functions, for the references."""
    z = model.dense1(x)
    z, state = bnjax.batchnorm_apply(model.bn.params, state, z, True)
    z = model.dense2(jax.nn.relu(z))
    return bnjax.layernorm_apply(model.ln.params, z), state


def _batch(seed=0, n=8):
    return jnp.asarray(random_input(np.random.default_rng(seed), (n, 3)))


def test_nnx_jit_equals_eager_and_updates_the_statistics():
    eager, compiled = _Net(), _Net()
    x = _batch()
    step = nnx.jit(lambda model, x: model(x))
    for _ in range(2):  # compiled and eager code round differently: float32 tolerance
        np.testing.assert_allclose(step(compiled, x), eager(x), **F32)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **F32), compiled.bn.stats, eager.bn.stats
    )
    assert int(compiled.bn.count[...]) == 2


def test_equally_configured_models_share_one_compilation():
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(None)
        return model(x)

    for model in (_Net(), _Net()):
        forward(model, _batch())
    assert len(traces) == 1
    assert _Net().bn.normalizer != bnnx.BatchNorm(4, momentum=0.5).normalizer


def test_a_layer_with_an_unhashable_keyword_is_equal_only_to_itself():
    first, second = bnnx.LayerNorm((3, 4), axis=[-2, -1]), bnnx.LayerNorm((3, 4), axis=[-2, -1])
    assert first.normalizer == first.normalizer and first.normalizer != second.normalizer
    np.testing.assert_array_equal(first(jnp.ones((2, 3, 4))), second(jnp.ones((2, 3, 4))))


def test_nnx_grad_equals_jax_grad_of_the_functional_model():
    model, x = _Net(), _batch()
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)

    def loss(bn_params, ln_params):
        z = model.dense1(x)
        z, _ = bnjax.batchnorm_apply(bn_params, bnjax.batchnorm_init(4)[1], z, True)
        z = bnjax.layernorm_apply(ln_params, model.dense2(jax.nn.relu(z)))
        return jnp.sum(jnp.sin(z))

    expected = jax.grad(loss, argnums=(0, 1))(model.bn.params, model.ln.params)
    for got, want in zip((grads["bn"], grads["ln"]), expected, strict=True):
        np.testing.assert_array_equal(got["scale"][...], want.scale)
        np.testing.assert_array_equal(got["bias"][...], want.bias)


def test_nnx_vmap_with_axis_name_pools_the_mapped_batch():
    # flax#4760: nnx.vmap over a model with BatchNorm, the model broadcast.
    model, reference = _Net(axis_name="batch"), _Net()
    xs = _batch(n=12).reshape(3, 4, 3)
    mapped = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")
    for _ in range(2):
        ys = mapped(model, xs)
        expected = reference(xs.reshape(12, 3))
    np.testing.assert_allclose(ys.reshape(12, 4), expected, **SYNC_TOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **SYNC_TOL),
        model.bn.stats,
        reference.bn.stats,
    )


def test_masked_statistics_under_nnx_vmap_pool_the_unmasked_entries_of_every_shard():
    # Flax pools masked statistics as a mean of per-device means; bnjax
    # weights by count, so shards with few valid entries count for little.
    layer, reference = bnnx.BatchNorm(4, axis_name="batch"), bnnx.BatchNorm(4)
    rng = np.random.default_rng(7)
    x = random_input(rng, (3, 5, 4)) + np.arange(3, dtype=np.float32)[:, None, None] * 4
    mask = np.array(
        [[True] * 5, [True, False, False, False, False], [True, True, False, True, False]]
    )
    mapped = nnx.vmap(lambda m, x, k: m(x, mask=k), in_axes=(None, 0, 0), axis_name="batch")
    y = mapped(layer, x, mask)
    expected = reference(x.reshape(15, 4), mask=mask.reshape(15))
    np.testing.assert_allclose(y.reshape(15, 4), expected, **SYNC_TOL)
    np.testing.assert_allclose(layer.mean[...], reference.mean[...], **SYNC_TOL)
    np.testing.assert_allclose(layer.var[...], reference.var[...], **SYNC_TOL)


def test_nnx_eval_shape_builds_an_abstract_model():
    # flax#4734: nnx.eval_shape fails on Flax's BatchNorm.
    abstract = nnx.eval_shape(lambda: _Net())
    mean, count = abstract.bn.mean.get_value(), abstract.bn.count.get_value()
    assert isinstance(mean, jax.ShapeDtypeStruct)
    assert (mean.shape, count.dtype) == ((4,), jnp.int32)


def test_shard_map_with_axis_name_equals_the_whole_batch():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    model, reference = _Net(axis_name="data"), _Net()
    x = _batch(n=2 * len(devices))
    graphdef, variables = nnx.split(model)

    @jax.jit
    def step(variables, x):
        def per_device(variables, x):
            local = nnx.merge(graphdef, variables)
            y = local(x)
            return y, nnx.state(local)

        return jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(jax.P(), jax.P("data")),
            out_specs=(jax.P("data"), jax.P()),
        )(variables, x)

    y, variables = step(variables, x)
    nnx.update(model, variables)
    np.testing.assert_allclose(y, reference(x), **SYNC_TOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **SYNC_TOL),
        model.bn.stats,
        reference.bn.stats,
    )


def test_train_and_eval_switch_every_layer():
    model, x = _Net(), _batch()
    model(x)
    model.eval()
    before = model.bn.stats
    y = model(x)
    jax.tree.map(np.testing.assert_array_equal, model.bn.stats, before)
    z = model.dense1(x)
    z, _ = bnjax.batchnorm_apply(model.bn.params, before, z, False)
    expected = bnjax.layernorm_apply(model.ln.params, model.dense2(jax.nn.relu(z)))
    np.testing.assert_array_equal(y, expected)
    model.train()
    model(x)
    assert int(model.bn.count[...]) == 2


def test_precise_batch_stats_gives_the_pooled_moments_of_each_layer_input():
    model = _Net()
    model.bn.load_stats(
        bnjax.BatchStats(jnp.full(4, 5.0), jnp.full(4, 7.0), jnp.array(3, jnp.int32))
    )
    model.eval()  # the tool runs bnjax's batch layers in training mode anyway
    batches = [_batch(seed, n) for seed, n in [(1, 8), (2, 5)]]
    bnnx.precise_batch_stats(model, batches)
    inputs = np.concatenate([f64(model.dense1(b)) for b in batches])
    np.testing.assert_allclose(model.bn.mean[...], inputs.mean(0), **F32)
    np.testing.assert_allclose(model.bn.var[...], inputs.var(0), **F32)
    assert int(model.bn.count[...]) == 3
    assert model.bn.collected is None and model.bn.use_running_average


def test_precise_batch_stats_needs_a_batch_layer():
    with pytest.raises(ValueError, match="BatchNorm or BatchRenorm"):
        bnnx.precise_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [jnp.ones((2, 2))])


def test_weight_decay_mask_spares_the_normalization_parameters_in_nnx_optimizer():
    model = _Net()
    mask = bnnx.weight_decay_mask(model)
    assert mask["bn"] == {"scale": False, "bias": False} and mask["ln"]["scale"] is False
    assert mask["dense1"] == {"kernel": True, "bias": True}
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.adamw(0.1, weight_decay=0.5, mask=mask), wrt=nnx.Param)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zero_grads)  # with zero gradients only weight decay moves anything
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(after["bn"]["scale"], before["bn"]["scale"])
    np.testing.assert_array_equal(after["ln"]["bias"], before["ln"]["bias"])
    assert not np.allclose(after["dense1"]["kernel"], before["dense1"]["kernel"])


def test_folding_reads_the_layer_params_and_stats():
    model, x = _Net(), _batch()
    model(x)
    model.eval()
    kernel, bias = bnjax.fold_batchnorm_after(
        model.dense1.kernel[...], model.dense1.bias[...], model.bn.params, model.bn.stats
    )
    np.testing.assert_allclose(x @ kernel + bias[None], model.bn(model.dense1(x)), **F32)


def test_torch_batchnorm_loads_into_the_layer():
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm1d(4)
    theirs.train()
    theirs(torch.randn(16, 4) * 2 + 1)
    theirs.eval()
    params, stats = bnjax.convert.from_torch_batchnorm(theirs.state_dict())
    layer = bnnx.BatchNorm(4, use_running_average=True)
    layer.load_params(params)
    layer.load_stats(stats)
    x = random_input(np.random.default_rng(6), (5, 4))
    expected = theirs(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(layer(x), expected, **F32)


def test_loading_values_of_another_shape_or_presence_is_an_error():
    layer = bnnx.BatchNorm(4, use_bias=False)
    with pytest.raises(
        ValueError, match=r"`scale` must have shape \(4,\) and dtype float32, got shape \(3,\)"
    ):
        layer.load_params(bnjax.NormParams(jnp.ones(3), None))
    with pytest.raises(ValueError, match="`bias` must be None for this layer"):
        layer.load_params(bnjax.NormParams(jnp.ones(4), jnp.ones(4)))
    with pytest.raises(ValueError, match="`count` must have shape"):
        layer.load_stats(bnjax.BatchStats(jnp.ones(4), jnp.ones(4), jnp.array(0.0)))


def test_hyperparameters_are_checked_by_the_factory_at_construction():
    with pytest.raises(ValueError, match="momentum"):
        bnnx.BatchNorm(4, momentum=1.5)
    with pytest.raises(ValueError, match="num_groups"):
        bnnx.GroupNorm(6, num_groups=4)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bnnx.LayerNorm(4, momentum=0.9)


def test_axes_that_do_not_fit_the_feature_shape_are_an_error_at_construction():
    with pytest.raises(
        ValueError, match=r"one axis per entry of the feature shape \(3, 4\), got -1"
    ):
        bnnx.LayerNorm((3, 4), axis=-1)
    with pytest.raises(TypeError, match="`axis` must be an int or a tuple of ints, got 'last'"):
        bnnx.RMSNorm(4, axis="last")
