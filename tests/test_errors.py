"""Every row of SPEC's error table, raised at trace time with a clear message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def _bn(x, train=True, **kwargs):
    params, state = bnjax.batchnorm_init(x.shape[kwargs.get("axis", -1)])
    return bnjax.batchnorm_apply(params, state, x, train, **kwargs)


X = jnp.ones((4, 3))


@pytest.mark.parametrize(
    "params_size, state_size, bad_name",
    [(5, 3, "params.scale"), (3, 5, "state.mean")],
    ids=["params", "state"],
)
def test_batchnorm_size_mismatch_is_value_error(params_size, state_size, bad_name):
    params, _ = bnjax.batchnorm_init(params_size)
    _, state = bnjax.batchnorm_init(state_size)
    with pytest.raises(ValueError, match=rf"`{bad_name}` must have shape \(3,\).*got \(5,\)"):
        bnjax.batchnorm_apply(params, state, X, True)


def test_batchnorm_size_mismatch_is_checked_in_eval_mode_too():
    params, state = bnjax.batchnorm_init(5)
    with pytest.raises(ValueError, match="params.scale"):
        bnjax.batchnorm_apply(params, state, X, False)


def test_layernorm_param_shape_mismatch_is_value_error():
    params = bnjax.layernorm_init((3, 4))
    with pytest.raises(ValueError, match=r"`params.scale` must have shape \(4, 3\).*got \(3, 4\)"):
        bnjax.layernorm_apply(params, jnp.ones((2, 4, 3)), axis=(1, 2))


@pytest.mark.parametrize("axis", [2, -3], ids=["too-large", "too-small"])
def test_batchnorm_axis_out_of_range_is_value_error(axis):
    with pytest.raises(ValueError, match=rf"`axis` must be in \[-2, 2\).*got {axis}"):
        bnjax.batchnorm_apply(*bnjax.batchnorm_init(3), X, True, axis=axis)


@pytest.mark.parametrize(
    "axis, message",
    [(5, "must be in"), ((1, -1), "must not repeat"), ((), "at least one axis")],
    ids=["out-of-range", "repeated", "empty"],
)
def test_layernorm_bad_axis_is_value_error(axis, message):
    with pytest.raises(ValueError, match=message):
        bnjax.layernorm_apply(bnjax.layernorm_init(3), jnp.ones((2, 3)), axis=axis)


def test_batchnorm_feature_axis_must_be_one_int():
    with pytest.raises(TypeError, match="`axis` must be a single int"):
        bnjax.batchnorm_apply(*bnjax.batchnorm_init(3), X, True, axis=(0, 1))


@pytest.mark.parametrize(
    "shape, axis",
    [((1, 3), -1), ((1, 3, 1, 1), 1), ((3,), -1)],
    ids=["N1-C3", "N1-C3-H1-W1-nchw", "rank1"],
)
def test_batchnorm_training_on_one_value_per_feature_is_value_error(shape, axis):
    with pytest.raises(ValueError, match="more than one value per feature"):
        _bn(jnp.ones(shape), axis=axis)


def test_batchnorm_eval_on_a_batch_of_one_is_allowed():
    y, _ = _bn(jnp.ones((1, 3)), train=False)
    assert y.shape == (1, 3)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_], ids=str)
def test_integer_or_bool_input_is_type_error(dtype):
    x = jnp.ones((4, 3), dtype)
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        _bn(x)
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        bnjax.layernorm_apply(bnjax.layernorm_init(3), x)


# (x shape, feature axis, mask shape, the message): every message names both shapes.
MASK_ERROR_CASES = [
    ((4, 5, 3), -1, (3,), r"`mask` must broadcast to `x`'s shape \(4, 5, 3\).*got shape \(3,\)"),
    (
        (4, 5, 3),
        -1,
        (4, 1, 3),
        r"`mask` must broadcast to `x`'s shape \(4, 5, 3\).*size 1 on the feature axis, "
        r"got shape \(4, 1, 3\)",
    ),
    (
        (4, 5, 3),
        -1,
        (1, 4, 5, 3),
        r"`mask` must have at most the rank of `x` \(shape \(4, 5, 3\)\), got shape \(1, 4, 5, 3\)",
    ),
    (
        (4, 3, 5, 6),
        1,
        (4, 5, 6),
        r"got shape \(4, 5, 6\) for `x` of shape \(4, 3, 5, 6\)\. Give the mask `x`'s rank, "
        r"with size 1 on the feature axis, e.g\. \(4, 1, 5, 6\)",
    ),
]
MASK_ERROR_IDS = [
    "wrong-size",
    "varies-along-feature-axis",
    "too-many-axes",
    "reaches-feature-axis",
]


@pytest.mark.parametrize("shape, axis, mask_shape, message", MASK_ERROR_CASES, ids=MASK_ERROR_IDS)
def test_batchnorm_mask_not_broadcastable_is_value_error(shape, axis, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        _bn(jnp.ones(shape), axis=axis, mask=jnp.ones(mask_shape, bool))


def test_batchnorm_non_boolean_mask_is_type_error():
    with pytest.raises(TypeError, match="`mask` must be boolean"):
        _bn(X, mask=jnp.ones((4,)))


@pytest.mark.parametrize("momentum", [-0.1, 1.5], ids=["negative", "above-one"])
def test_momentum_outside_unit_interval_is_value_error(momentum):
    with pytest.raises(ValueError, match=rf"`momentum` must be in \[0, 1\].*got {momentum}"):
        _bn(X, momentum=momentum)


@pytest.mark.parametrize("epsilon", [0.0, -1e-5], ids=["zero", "negative"])
def test_nonpositive_epsilon_is_value_error(epsilon):
    with pytest.raises(ValueError, match=rf"`epsilon` must be > 0, got {epsilon}"):
        _bn(X, epsilon=epsilon)
    with pytest.raises(ValueError, match="`epsilon` must be > 0"):
        bnjax.layernorm_apply(bnjax.layernorm_init(3), X, epsilon=epsilon)


def test_traced_train_is_type_error_with_static_hint():
    params, state = bnjax.batchnorm_init(3)
    traced = jax.jit(bnjax.batchnorm_apply)
    with pytest.raises(TypeError, match=r"`train` must be a Python bool.*static_argnames"):
        traced(params, state, X, True)


def test_non_bool_train_is_type_error():
    with pytest.raises(TypeError, match="`train` must be a Python bool, got 1"):
        _bn(X, train=1)


def test_numpy_bool_train_is_accepted():
    y, _ = _bn(X, train=np.bool_(True))
    assert y.shape == X.shape


def test_unbound_axis_name_is_value_error_naming_it():
    with pytest.raises(ValueError, match="'devices'.*not bound"):
        _bn(X, axis_name="devices")


@pytest.mark.parametrize("size", [0, -2, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_init_with_bad_size_is_value_error(size):
    with pytest.raises(ValueError, match="must be a positive int"):
        bnjax.batchnorm_init(size)
    with pytest.raises(ValueError, match="must be a positive int"):
        bnjax.layernorm_init(size)


def test_errors_are_raised_at_trace_time_under_jit():
    params, state = bnjax.batchnorm_init(3)
    apply = jax.jit(bnjax.batchnorm_apply, static_argnames=("train", "momentum"))
    with pytest.raises(ValueError, match="`momentum`"):
        apply(params, state, X, train=True, momentum=2.0)
