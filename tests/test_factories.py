"""The `Normalizer(init, apply)` interface, one contract for every factory.

A contract suite runs over every normalizer the factories build, in each mode
where the modes differ (optax runs one suite over all its optimizers the same
way): jit, vmap, second-order derivatives, dtype policy, eval mode, `init`
under `eval_shape`, state through `lax.scan` and `lax.cond`, no retracing.
Then: one model trains with any normalizer; factories bind their
hyperparameters; and property-based tests of what a normalization is (groups
of mean 0 and variance 1, invariance to a per-group affine map of the input,
a constant input gives `bias`), checked against closed forms.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import bnjax
from tests.helpers import perturbed_params
from tests.tolerances import CHECK_GRADS_TOL

SHAPE = (4, 3, 3, 4)  # NHWC

# name -> factory taking `**hyper` (param_dtype, epsilon, ...) on top of the
# hyperparameters that define the case.
FACTORIES = {
    "batchnorm": bnjax.batchnorm,
    "batchnorm-ghost": functools.partial(bnjax.batchnorm, virtual_batch_size=2),
    "batchrenorm": bnjax.batchrenorm,
    "layernorm": bnjax.layernorm,
    "rmsnorm": bnjax.rmsnorm,
    "groupnorm": functools.partial(bnjax.groupnorm, num_groups=2),
    "instancenorm": bnjax.instancenorm,
}
NAMES = list(FACTORIES)
STATEFUL = ("batchnorm", "batchnorm-ghost", "batchrenorm")
STATELESS = tuple(n for n in NAMES if n not in STATEFUL)
# The modes differ only for the normalizers with running statistics.
CASES = [(n, True) for n in NAMES] + [(n, False) for n in STATEFUL]
CASE_IDS = [f"{n}-{'train' if t else 'eval'}" for n, t in CASES]

# Compiled and eager float32 code may fuse and reassociate differently: a few
# ulps of O(1) outputs, and of running statistics of O(1)-O(10) values.
JIT_TOL = dict(rtol=1e-6, atol=1e-6)
# vmap batches the same reductions; XLA may still pick another reduction order.
VMAP_TOL = JIT_TOL
# Three SGD steps in float32: the losses are O(1), and the decrease asserted
# is strict, so no tolerance is needed there.


def _input(shape=SHAPE, dtype=jnp.float32, seed=1):
    return (2.0 + 3.0 * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _random_state(state):
    """Running statistics that differ from the initial ones, so eval mode is not trivial."""
    if state is None:
        return None
    c = state.mean.shape[0]
    return bnjax.BatchStats(
        mean=jnp.linspace(-1.0, 1.0, c, dtype=state.mean.dtype),
        var=jnp.linspace(0.5, 2.0, c, dtype=state.var.dtype),
        count=jnp.int32(3),
    )


def _setup(name, dtype=jnp.float32, shape=SHAPE, **hyper):
    norm = FACTORIES[name](param_dtype=dtype, **hyper)
    params, state = norm.init(shape)
    return norm, perturbed_params(params), _random_state(state)


def _assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


# ---------------------------------------------------------------------------
# The contract suite.


@pytest.mark.parametrize("name,train", CASES, ids=CASE_IDS)
def test_jit_equals_eager(name, train):
    norm, params, state = _setup(name)
    x = _input()
    jitted = jax.jit(norm.apply, static_argnames="train")(params, state, x, train=train)
    _assert_trees_close(jitted, norm.apply(params, state, x, train), **JIT_TOL)


@pytest.mark.parametrize("name,train", CASES, ids=CASE_IDS)
def test_vmap_over_a_stacking_axis_equals_a_python_loop(name, train):
    norm, params, state = _setup(name)
    xs = _input((3, *SHAPE))
    mapped = jax.vmap(lambda x: norm.apply(params, state, x, train))(xs)
    outputs = [norm.apply(params, state, x, train) for x in xs]
    looped = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
    _assert_trees_close(mapped, looped, **VMAP_TOL)


@pytest.fixture
def quick_compile():
    """Most XLA optimizations off, restored after: check_grads of order 2
    compiles about eight derivatives of a tiny function per case, and the
    compile time, not the run time, is the cost. The values are unchanged up
    to rounding (float64), far below CHECK_GRADS_TOL."""
    flag = "jax_disable_most_optimizations"
    old = jax.config.values[flag]
    jax.config.update(flag, True)
    yield
    jax.config.update(flag, old)


@pytest.mark.parametrize("name,train", CASES, ids=CASE_IDS)
def test_derivatives_match_finite_differences_to_second_order(name, train, x64, quick_compile):
    norm, params, state = _setup(name, jnp.float64)
    if name == "batchrenorm" and train:
        # Batch Renorm holds r and d out of the gradient (Ioffe 2017), which
        # finite differences cannot see unless r and d are constant near x:
        # running statistics far from the batch's clip both (r = r_max,
        # d = d_max), and then the held-out gradient is the exact one.
        c = SHAPE[-1]
        state = bnjax.BatchStats(
            jnp.full((c,), -10.0, jnp.float64), jnp.full((c,), 0.01, jnp.float64), jnp.int32(0)
        )
    x = _input(dtype=jnp.float64)
    # A fixed random cotangent: the plain sum of a normalized output has a
    # zero gradient, which would hide errors.
    weights = jax.random.normal(jax.random.key(2), SHAPE, jnp.float64)

    def loss(params, x):
        y, _ = norm.apply(params, state, x, train)
        return jnp.sum(jnp.tanh(y) * weights)

    # jit: one compilation per derivative instead of op-by-op dispatch.
    check_grads(jax.jit(loss), (params, x), order=2, modes=("fwd", "rev"), **CHECK_GRADS_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name,train", CASES, ids=CASE_IDS)
def test_half_precision_input_keeps_its_dtype_and_float32_params_and_state(name, train, dtype):
    norm, params, state = _setup(name)
    y, new_state = norm.apply(params, state, _input(dtype=dtype), train)
    assert y.dtype == dtype and y.shape == SHAPE
    assert bool(jnp.all(jnp.isfinite(y)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    if name in STATEFUL:
        assert new_state.mean.dtype == new_state.var.dtype == jnp.float32
        assert new_state.count.dtype == jnp.int32
    else:
        assert new_state is None


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_returns_the_state_unchanged(name):
    norm, params, state = _setup(name)
    _, new_state = norm.apply(params, state, _input(), False)
    assert new_state is state


@pytest.mark.parametrize("name", NAMES)
def test_init_under_eval_shape_matches_the_eager_init(name):
    norm = FACTORIES[name]()
    abstract = jax.eval_shape(functools.partial(norm.init, SHAPE))
    concrete = norm.init(SHAPE)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (c.shape, c.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_state_threads_through_lax_scan_as_through_a_python_loop(name):
    norm, params, state = _setup(name)
    batches = _input((5, *SHAPE))

    def step(state, x):
        y, state = norm.apply(params, state, x, True)
        return state, y

    scanned_state, scanned_ys = jax.lax.scan(step, state, batches)
    looped_ys = []
    for x in batches:
        state, y = step(state, x)
        looped_ys.append(y)
    np.testing.assert_allclose(scanned_ys, jnp.stack(looped_ys), **JIT_TOL)
    _assert_trees_close(scanned_state, state, **JIT_TOL)
    if name in STATEFUL:
        assert int(scanned_state.count) == 3 + 5


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_branches_under_lax_cond(name):
    norm, params, state = _setup(name)
    x = _input()

    @jax.jit
    def run(is_training):
        return jax.lax.cond(
            is_training,
            lambda: norm.apply(params, state, x, True),
            lambda: norm.apply(params, state, x, False),
        )

    for train in (True, False):
        _assert_trees_close(run(train), norm.apply(params, state, x, train), **JIT_TOL)


@pytest.mark.parametrize("name", NAMES)
def test_jitted_training_step_traces_once_for_new_values(name):
    norm, params, state = _setup(name)
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(None)
        return norm.apply(params, state, x, True)

    for seed in range(3):
        _, state = step(params, state, _input(seed=seed))
    assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_traced_train_raises_type_error(name):
    norm, params, state = _setup(name)
    x = _input()
    with pytest.raises(TypeError, match="train"):
        jax.jit(lambda train: norm.apply(params, state, x, train))(True)


@pytest.mark.parametrize("name", STATELESS)
def test_stateless_normalizers_have_no_state(name):
    norm = FACTORIES[name]()
    params, state = norm.init(SHAPE)
    assert state is None
    for train in (True, False):
        assert norm.apply(params, state, _input(), train)[1] is None


# ---------------------------------------------------------------------------
# One line switches the normalizer.


def _model_init(norm, key, shape=SHAPE, features=4):
    norm_params, norm_state = norm.init(shape)
    kernel = jax.random.normal(key, (shape[-1], features)) / jnp.sqrt(shape[-1])
    return {"kernel": kernel, "norm": norm_params}, norm_state


def _model_loss(norm, params, state, x, target):
    """A dense layer, a normalizer and tanh; the same code for every normalizer."""
    h = x @ params["kernel"]
    h, state = norm.apply(params["norm"], state, h, True)
    return jnp.mean((jnp.tanh(h) - target) ** 2), state


def _train(norm, steps=3):
    x = _input(seed=5)
    target = jnp.tanh(jax.random.normal(jax.random.key(6), SHAPE))
    params, state = _model_init(norm, jax.random.key(7))
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, state, opt_state):
        grad_fn = jax.value_and_grad(functools.partial(_model_loss, norm), has_aux=True)
        (loss, state), grads = grad_fn(params, state, x, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    losses = []
    for _ in range(steps):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    final, _ = _model_loss(norm, params, state, x, target)
    return losses + [float(final)]


@pytest.mark.parametrize("name", NAMES)
def test_one_model_trains_with_every_normalizer(name):
    losses = _train(FACTORIES[name]())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------
# Factories bind hyperparameters.


def test_batchnorm_factory_binds_momentum():
    norm = bnjax.batchnorm(momentum=0.5)
    params, state = norm.init(SHAPE)
    x = _input()
    bound = norm.apply(params, state, x, True)
    direct = bnjax.batchnorm_apply(params, state, x, True, momentum=0.5)
    _assert_trees_close(bound, direct, rtol=0, atol=0)
    default = bnjax.batchnorm_apply(params, state, x, True)
    assert not np.allclose(bound[1].mean, default[1].mean)


def test_batchrenorm_factory_binds_its_limits():
    norm = bnjax.batchrenorm(r_max=1.5, d_max=0.5, epsilon=1e-3)
    params, state = norm.init(SHAPE)
    x = _input()
    direct = bnjax.batchrenorm_apply(params, state, x, True, r_max=1.5, d_max=0.5, epsilon=1e-3)
    _assert_trees_close(norm.apply(params, state, x, True), direct, rtol=0, atol=0)


def test_groupnorm_factory_binds_num_groups_and_epsilon():
    norm = bnjax.groupnorm(num_groups=2, epsilon=1e-2)
    params, _ = norm.init(SHAPE)
    x = _input()
    direct = bnjax.groupnorm_apply(params, x, num_groups=2, epsilon=1e-2)
    np.testing.assert_array_equal(norm.apply(params, None, x, True)[0], direct)


def test_layernorm_factory_creates_params_of_the_normalized_axes_shape():
    norm = bnjax.layernorm(axis=(1, 2, 3))
    params, state = norm.init(SHAPE)
    assert params.scale.shape == params.bias.shape == SHAPE[1:]
    assert state is None
    x = _input()
    direct = bnjax.layernorm_apply(params, x, axis=(1, 2, 3))
    np.testing.assert_array_equal(norm.apply(params, state, x, True)[0], direct)


def test_rmsnorm_factory_creates_a_scale_and_no_bias():
    params, _ = bnjax.rmsnorm(axis=(2, 3)).init(SHAPE)
    assert params.scale.shape == SHAPE[2:] and params.bias is None


def test_factory_param_dtype_sets_params_and_state_dtype(x64):
    params, state = bnjax.batchnorm(param_dtype=jnp.float64).init(SHAPE)
    assert params.scale.dtype == state.mean.dtype == state.var.dtype == jnp.float64


def test_groupnorm_init_rejects_num_groups_that_do_not_divide_the_channels():
    norm = bnjax.groupnorm(num_groups=3)
    with pytest.raises(ValueError, match="num_groups"):
        norm.init((2, 4, 4, 8))


@pytest.mark.parametrize(
    "factory,hyper",
    [
        (bnjax.batchnorm, dict(momentum=1.5)),
        (bnjax.batchnorm, dict(momentum=-0.1)),
        (bnjax.batchnorm, dict(epsilon=0.0)),
        (bnjax.batchrenorm, dict(momentum=2.0)),
        (bnjax.batchrenorm, dict(epsilon=-1e-5)),
        (bnjax.batchrenorm, dict(r_max=0.5)),
        (bnjax.batchrenorm, dict(d_max=-1.0)),
        (bnjax.layernorm, dict(epsilon=0.0)),
        (bnjax.rmsnorm, dict(epsilon=-1.0)),
        (bnjax.groupnorm, dict(epsilon=0.0)),
        (bnjax.groupnorm, dict(num_groups=0)),
        (bnjax.instancenorm, dict(epsilon=0.0)),
    ],
    ids=[
        "batchnorm-momentum-above-1",
        "batchnorm-momentum-negative",
        "batchnorm-epsilon-zero",
        "batchrenorm-momentum",
        "batchrenorm-epsilon",
        "batchrenorm-r_max",
        "batchrenorm-d_max",
        "layernorm-epsilon",
        "rmsnorm-epsilon",
        "groupnorm-epsilon",
        "groupnorm-num_groups",
        "instancenorm-epsilon",
    ],
)
def test_factory_rejects_bad_hyperparameters_at_once(factory, hyper):
    (arg,) = hyper
    with pytest.raises(ValueError, match=arg):
        factory(**hyper)


# ---------------------------------------------------------------------------
# Properties, checked with hypothesis in float64 (x64 is enabled inside each
# test: hypothesis does not rerun function-scoped fixtures per example).


def _group_index(name, shape=SHAPE):
    """`(groups, members)` indices into the flattened input: the sets normalized together."""
    n, h, w, c = shape
    idx = np.arange(np.prod(shape)).reshape(shape)
    if name in ("batchnorm", "batchrenorm"):
        return idx.transpose(3, 0, 1, 2).reshape(c, -1)
    if name == "batchnorm-ghost":  # consecutive pairs of examples, per channel
        return idx.reshape(n // 2, 2, h, w, c).transpose(0, 4, 1, 2, 3).reshape(n // 2 * c, -1)
    if name in ("layernorm", "rmsnorm"):  # axis=-1
        return idx.reshape(-1, c)
    if name == "groupnorm":  # 2 groups of consecutive channels
        return idx.reshape(n, h, w, 2, c // 2).transpose(0, 3, 1, 2, 4).reshape(n * 2, -1)
    assert name == "instancenorm"
    return idx.transpose(0, 3, 1, 2).reshape(n * c, -1)


def _groups(name, y):
    return np.asarray(y, np.float64).reshape(-1)[_group_index(name)]


def _ungroup(name, g):
    flat = np.empty(np.prod(SHAPE))
    flat[_group_index(name)] = g
    return flat.reshape(SHAPE)


def _grouped_input(name, seed, std, offset):
    """Each group has mean `offset` and biased variance `std**2` exactly (up to rounding)."""
    g = np.random.default_rng(seed).standard_normal(_group_index(name).shape)
    g = (g - g.mean(1, keepdims=True)) / g.std(1, keepdims=True)
    return _ungroup(name, std * g + offset)


EPSILON = {n: 1e-6 if n == "rmsnorm" else 1e-5 for n in NAMES}  # the factories' defaults
SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
stds = st.floats(0.5, 10.0)
offsets = st.floats(-100.0, 100.0)
# Rounding in float64: values up to ~130 (offset + 3 std), statistics of up to
# 36 entries, divided by std >= 0.5: ~1e-16 * 130 * 36 / 0.5 ~ 1e-12. The
# epsilon effects are in the closed forms, not in the tolerances.
PROP_TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("batchrenorm", "rmsnorm")])
@SETTINGS
@given(seed=seeds, std=stds, offset=offsets)
def test_normalized_groups_have_mean_zero_and_unit_variance(name, seed, std, offset):
    with jax.enable_x64(True):
        norm = FACTORIES[name]()
        params, state = norm.init(SHAPE)
        y, _ = norm.apply(params, state, jnp.asarray(_grouped_input(name, seed, std, offset)), True)
        g = _groups(name, y)
    np.testing.assert_allclose(g.mean(1), 0.0, **PROP_TOL)
    # var(y) = var(x) / (var(x) + epsilon), the biased variance.
    np.testing.assert_allclose(g.var(1), std**2 / (std**2 + EPSILON[name]), **PROP_TOL)


@SETTINGS
@given(seed=seeds, std=stds, offset=offsets)
def test_rmsnorm_groups_have_unit_mean_square(seed, std, offset):
    with jax.enable_x64(True):
        norm = FACTORIES["rmsnorm"]()
        params, state = norm.init(SHAPE)
        x = _grouped_input("rmsnorm", seed, std, offset)
        y, _ = norm.apply(params, state, jnp.asarray(x), True)
        g = _groups("rmsnorm", y)
    ms = std**2 + offset**2  # the mean square of every group
    np.testing.assert_allclose(np.mean(g**2, 1), ms / (ms + EPSILON["rmsnorm"]), **PROP_TOL)


@SETTINGS
@given(seed=seeds, std=stds, offset=offsets)
def test_batchrenorm_channels_have_the_corrected_mean_and_std(seed, std, offset):
    # From the initial running statistics (mean 0, var 1), r and d follow
    # from the batch's: each channel of y has mean d and std r * std / sigma_B.
    eps = EPSILON["batchrenorm"]
    with jax.enable_x64(True):
        norm = FACTORIES["batchrenorm"]()
        params, state = norm.init(SHAPE)
        x = _grouped_input("batchrenorm", seed, std, offset)
        y, _ = norm.apply(params, state, jnp.asarray(x), True)
        g = _groups("batchrenorm", y)
    sigma_batch = np.sqrt(std**2 + eps)
    r = np.clip(sigma_batch / np.sqrt(1 + eps), 1 / 3, 3)
    d = np.clip(offset / np.sqrt(1 + eps), -5, 5)
    np.testing.assert_allclose(g.mean(1), d, **PROP_TOL)
    np.testing.assert_allclose(g.std(1), r * std / sigma_batch, **PROP_TOL)


def _affine_per_group(name, x, a, b):
    """`a * x + b`, with a different `a` and `b` for every group of `name`."""
    g = _groups(name, x)
    return _ungroup(name, a[:, None] * g + b[:, None])


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(seed=seeds, std=stds, offset=offsets, data=st.data())
def test_output_is_unchanged_by_an_affine_map_of_each_group(name, seed, std, offset, data):
    num_groups = _group_index(name).shape[0]
    factors = st.lists(st.floats(0.5, 2.0), min_size=num_groups, max_size=num_groups)
    shifts = st.lists(st.floats(-10.0, 10.0), min_size=num_groups, max_size=num_groups)
    a = np.array(data.draw(factors))
    # RMSNorm divides by the root mean square, without centering: only scaling.
    b = np.zeros(num_groups) if name == "rmsnorm" else np.array(data.draw(shifts))
    # Epsilon is what breaks the invariance; a negligible one makes it exact
    # up to rounding, instead of to ~epsilon / var.
    hyper = dict(epsilon=1e-30)
    with jax.enable_x64(True):
        norm = FACTORIES[name](**hyper)
        params, state = norm.init(SHAPE)
        x = _grouped_input(name, seed, std, offset)
        y, _ = norm.apply(params, state, jnp.asarray(x), True)
        moved_state = state
        if name == "batchrenorm":
            # r and d compare the batch with the running statistics: the map
            # moves those too (per channel, the groups of batchrenorm).
            moved_state = state._replace(mean=a * state.mean + b, var=a**2 * state.var)
        moved = _affine_per_group(name, x, a, b)
        y_moved, _ = norm.apply(params, moved_state, jnp.asarray(moved), True)
    np.testing.assert_allclose(y_moved, y, **PROP_TOL)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(c=st.floats(-100.0, 100.0), seed=seeds)
def test_a_constant_input_gives_bias(name, c, seed):
    with jax.enable_x64(True):
        norm = FACTORIES[name](param_dtype=jnp.float64)
        params, state = norm.init(SHAPE)
        params = perturbed_params(params, seed % 1000)
        y, _ = norm.apply(params, state, jnp.full(SHAPE, c, jnp.float64), True)
        y = np.asarray(y)
        scale = np.asarray(params.scale)
        bias = None if params.bias is None else np.asarray(params.bias)
    eps = EPSILON[name]
    if name == "rmsnorm":
        # No centering and no bias: y = c / sqrt(c**2 + epsilon) * scale,
        # sign(c) * scale unless |c| is comparable to sqrt(epsilon).
        expected = c / np.sqrt(c**2 + eps) * scale
    elif name == "batchrenorm":
        # x - mean_B = 0, so y = d * scale + bias, d from the initial running
        # mean 0 and variance 1.
        expected = np.clip(c / np.sqrt(1 + eps), -5, 5) * scale + bias
    else:
        expected = bias
    # Rounding only: the mean of equal float64 values, times 1/sqrt(epsilon)
    # <= 1e3: ~1e-16 * 100 * 1e3 ~ 1e-11.
    np.testing.assert_allclose(y, np.broadcast_to(expected, SHAPE), rtol=1e-9, atol=1e-9)
