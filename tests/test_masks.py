"""SPEC's mask rule, one table for every normalizer.

Every normalizer takes a boolean `mask` with `mask.ndim <= x.ndim`: of `x`'s
rank it broadcasts by numpy's rules; with fewer axes it is aligned with `x`'s
leading axes and broadcast over the trailing ones. Normalizers with a
feature axis (BatchNorm, Batch Renorm, GroupNorm, InstanceNorm) take masks
that do not vary along it. Each behaviour runs over every `*_apply` function
and every factory's `Normalizer.apply`. Expected values come from the float64
numpy formulas in `references`, never from bnjax itself.
"""

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

import bnjax
from tests import references
from tests.helpers import perturbed_params, random_input, random_mask
from tests.tolerances import TOL

BATCH_NORMS = ("batchnorm", "batchrenorm")
FEATURE_AXIS_NORMS = (*BATCH_NORMS, "groupnorm", "instancenorm")
# LayerNorm and RMSNorm over their default axis=-1, and over every axis but
# the batch axis (numpy-ml's LayerNorm2D; not run on rank-2 input, where the two
# are the same).
ROW_NORMS = ("layernorm", "rmsnorm")
PER_EXAMPLE_NORMS = ("layernorm-per-example", "rmsnorm-per-example")
NORMS = (*FEATURE_AXIS_NORMS, *ROW_NORMS, *PER_EXAMPLE_NORMS)
INTERFACES = ("function", "factory")


def _hyper(norm: str, shape: tuple[int, ...], feature_axis: int) -> dict[str, Any]:
    """The keyword arguments shared by `norm`'s `*_apply` function and its factory.

    `feature_axis` is the feature (channel) axis of the layout; LayerNorm
    and RMSNorm ignore it and normalize over their own axes.
    """
    if norm in BATCH_NORMS:
        # momentum=0: the new running statistics are this batch's.
        return dict(axis=feature_axis, momentum=0.0)
    if norm == "groupnorm":
        return dict(axis=feature_axis, num_groups=math.gcd(shape[feature_axis], 2))
    if norm == "instancenorm":
        return dict(axis=feature_axis)
    if norm in PER_EXAMPLE_NORMS:
        return dict(axis=tuple(range(1, len(shape))))
    return dict(axis=-1)


def _normalized_shape(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def _layernorm_function(shape, hyper):
    def apply(params, state, x, mask):
        return bnjax.layernorm_apply(params, x, mask=mask, **hyper), state

    return (bnjax.layernorm_init(_normalized_shape(shape, hyper["axis"])), None), apply


def _rmsnorm_function(shape, hyper):
    def apply(params, state, x, mask):
        return bnjax.rmsnorm_apply(params, x, mask=mask, **hyper), state

    return (bnjax.rmsnorm_init(_normalized_shape(shape, hyper["axis"])), None), apply


def _batch_function(apply_fn):
    def make(shape, hyper):
        def apply(params, state, x, mask):
            return apply_fn(params, state, x, True, mask=mask, **hyper)

        return bnjax.batchnorm_init(shape[hyper["axis"]]), apply

    return make


def _per_example_function(apply_fn):
    def make(shape, hyper):
        def apply(params, state, x, mask):
            return apply_fn(params, x, mask=mask, **hyper), state

        return (bnjax.groupnorm_init(shape[hyper["axis"]]), None), apply

    return make


# name -> (x shape, hyper) -> ((params, state), apply(params, state, x, mask) -> (y, state)).
FUNCTIONS: dict[str, Callable] = {
    "batchnorm": _batch_function(bnjax.batchnorm_apply),
    "batchrenorm": _batch_function(bnjax.batchrenorm_apply),
    "groupnorm": _per_example_function(bnjax.groupnorm_apply),
    "instancenorm": _per_example_function(bnjax.instancenorm_apply),
    "layernorm": _layernorm_function,
    "rmsnorm": _rmsnorm_function,
}
FACTORIES: dict[str, Callable[..., bnjax.Normalizer]] = {
    "batchnorm": bnjax.batchnorm,
    "batchrenorm": bnjax.batchrenorm,
    "groupnorm": bnjax.groupnorm,
    "instancenorm": bnjax.instancenorm,
    "layernorm": bnjax.layernorm,
    "rmsnorm": bnjax.rmsnorm,
}


class Setup(NamedTuple):
    params: bnjax.NormParams
    state: bnjax.BatchStats | None
    apply: Callable  # (params, state, x, mask) -> (y, new_state), in training mode
    hyper: dict[str, Any]


def _setup(norm, interface, shape, feature_axis):
    """`norm` through `interface` for inputs of `shape`, with non-trivial params."""
    name = norm.removesuffix("-per-example")
    hyper = _hyper(norm, shape, feature_axis)
    if interface == "function":
        (params, state), apply = FUNCTIONS[name](shape, hyper)
    else:
        normalizer = FACTORIES[name](**hyper)
        params, state = normalizer.init(shape)

        def apply(params, state, x, mask):
            return normalizer.apply(params, state, x, True, mask=mask)

    return Setup(perturbed_params(params), state, apply, hyper)


def _run(setup, x, mask):
    """`setup.apply`, eagerly: the tests share a few shapes, so JAX's cache of
    compiled operations serves most of them (faster here than a jit per test)."""
    return setup.apply(setup.params, setup.state, x, mask)


def _reference(norm, setup, x, mask):
    """Float64 `(y, batch mean, batch var)` with a mask of `x`'s shape (statistics
    None for the normalizers without running state). Rows without a counted
    entry come out NaN."""
    scale, bias = (None if p is None else np.asarray(p, np.float64) for p in setup.params)
    hyper = setup.hyper
    with np.errstate(invalid="ignore", divide="ignore"):
        if norm == "batchnorm":
            return references.batchnorm(x, scale, bias, axis=hyper["axis"], mask=mask)
        if norm == "batchrenorm":
            state = setup.state
            y, mean, var, _, _ = references.batchrenorm(
                x, scale, bias, state.mean, state.var, axis=hyper["axis"], mask=mask
            )
            return y, mean, var
        if norm == "groupnorm":
            y = references.groupnorm(x, scale, bias, mask=mask, **hyper)
        elif norm == "instancenorm":
            y = references.instancenorm(x, scale, bias, axis=hyper["axis"], mask=mask)
        else:
            axis = hyper["axis"]
            axes = (axis,) if isinstance(axis, int) else axis
            if norm.startswith("layernorm"):
                y = references.layernorm(x, scale, bias, axes=axes, mask=mask)
            else:
                y = references.rmsnorm(x, scale, axes=axes, mask=mask)
    return y, None, None


def _assert_matches_reference(norm, setup, x, mask, y, new_state):
    """`y` and the new running statistics agree with the float64 reference
    given the mask at `x`'s shape by the leading-axes rule; outputs whose
    statistics count no entry need only be finite."""
    expected, mean, var = _reference(norm, setup, x, references.full_mask(mask, x.shape))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(np.isfinite(y))
    counted = np.isfinite(expected)
    assert counted.any()
    np.testing.assert_allclose(np.asarray(y)[counted], expected[counted], **TOL["float32"])
    if mean is not None:
        np.testing.assert_allclose(new_state.mean, mean, **TOL["float32"])
        np.testing.assert_allclose(new_state.var, var, **TOL["float32"])


def _cases(norms, layouts):
    """(norm, interface, layout...) for every combination, and their ids."""
    cases, ids = [], []
    for norm in norms:
        for interface in INTERFACES:
            for layout_id, *layout in layouts:
                if norm in PER_EXAMPLE_NORMS and len(layout[0]) == 2:
                    continue
                cases.append((norm, interface, *layout))
                ids.append(f"{norm}-{interface}-{layout_id}")
    return cases, ids


# --- Accepted shapes: the same for every normalizer ---------------------------

# (id, x shape, feature axis, mask shape): all distinct sizes, so a mask
# aligned with the wrong axes cannot fit by accident.
ACCEPTED = [
    ("NC-(N,)", (8, 4), -1, (8,)),
    ("NC-(N,1)", (8, 4), -1, (8, 1)),
    ("NTC-(N,)", (5, 6, 4), -1, (5,)),
    ("NTC-(N,T)", (5, 6, 4), -1, (5, 6)),
    ("NTC-(N,T,1)", (5, 6, 4), -1, (5, 6, 1)),
    ("NHWC-(N,)", (3, 5, 2, 4), -1, (3,)),
    ("NHWC-(N,1,1)", (3, 5, 2, 4), -1, (3, 1, 1)),
    ("NHWC-(N,H,W)", (3, 5, 2, 4), -1, (3, 5, 2)),
    ("NHWC-(N,H,W,1)", (3, 5, 2, 4), -1, (3, 5, 2, 1)),
    ("NCHW-(N,)", (3, 4, 5, 2), 1, (3,)),
    ("NCHW-(N,1,1,1)", (3, 4, 5, 2), 1, (3, 1, 1, 1)),
    ("NCHW-(N,1,H,W)", (3, 4, 5, 2), 1, (3, 1, 5, 2)),
]
ACCEPTED_CASES, ACCEPTED_IDS = _cases(NORMS, ACCEPTED)


def _masked_input(seed, shape, mask_shape):
    """Input whose masked entries are far off (so a leak shows), and a mask."""
    rng = np.random.default_rng(seed)
    x = random_input(rng, shape)
    mask = random_mask(rng, mask_shape)
    x[~references.full_mask(mask, shape)] *= 50.0
    return x, mask


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, mask_shape", ACCEPTED_CASES, ids=ACCEPTED_IDS
)
def test_mask_aligned_with_leading_axes_is_accepted_and_counts_those_entries(
    norm, interface, shape, feature_axis, mask_shape
):
    x, mask = _masked_input(0, shape, mask_shape)
    setup = _setup(norm, interface, shape, feature_axis)

    y, new_state = _run(setup, x, mask)

    _assert_matches_reference(norm, setup, x, mask, y, new_state)


# Without a feature axis, a mask of x's rank may vary along every axis.
FULL_MASK = [
    ("NTC-(N,T,C)", (5, 6, 4), -1, (5, 6, 4)),
    ("NHWC-(N,1,W,C)", (3, 5, 2, 4), -1, (3, 1, 2, 4)),
]
FULL_MASK_CASES, FULL_MASK_IDS = _cases((*ROW_NORMS, *PER_EXAMPLE_NORMS), FULL_MASK)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, mask_shape", FULL_MASK_CASES, ids=FULL_MASK_IDS
)
def test_layernorm_and_rmsnorm_accept_a_mask_varying_along_the_normalized_axes(
    norm, interface, shape, feature_axis, mask_shape
):
    x, mask = _masked_input(1, shape, mask_shape)
    setup = _setup(norm, interface, shape, feature_axis)

    y, new_state = _run(setup, x, mask)

    _assert_matches_reference(norm, setup, x, mask, y, new_state)


# --- What the old trailing-axes rule got silently wrong ------------------------

# NCHW with N == W: a trailing-aligned (N,) mask would select columns of W.
NCHW_N_EQUALS_W = [("NCHW-N=W", (4, 3, 4, 5), 1)]
EXAMPLE_MASK_CASES, EXAMPLE_MASK_IDS = _cases(NORMS, NCHW_N_EQUALS_W)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis", EXAMPLE_MASK_CASES, ids=EXAMPLE_MASK_IDS
)
def test_mask_of_shape_n_masks_examples_even_when_n_equals_the_last_axis(
    norm, interface, shape, feature_axis
):
    x, mask = _masked_input(2, shape, (shape[0],))
    setup = _setup(norm, interface, shape, feature_axis)

    y, new_state = _run(setup, x, mask)

    # The reference sees only the unmasked examples, and no mask.
    expected, mean, var = _reference(norm, setup, x[mask], None)
    np.testing.assert_allclose(np.asarray(y)[mask], expected, **TOL["float32"])
    assert np.all(np.isfinite(y))
    if mean is not None:
        np.testing.assert_allclose(new_state.mean, mean, **TOL["float32"])
        np.testing.assert_allclose(new_state.var, var, **TOL["float32"])


# (N, T, C) with N == T == C: a trailing-aligned (N, T) mask would select (T, C) entries.
TOKENS = [("NTC-N=T=C", (5, 5, 5), -1)]
TOKEN_MASK_CASES, TOKEN_MASK_IDS = _cases(ROW_NORMS, TOKENS)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis", TOKEN_MASK_CASES, ids=TOKEN_MASK_IDS
)
def test_mask_of_shape_n_t_masks_tokens_each_normalized_over_its_own_features(
    norm, interface, shape, feature_axis
):
    x, mask = _masked_input(3, shape, shape[:2])
    setup = _setup(norm, interface, shape, feature_axis)

    y, _ = _run(setup, x, mask)

    # Each unmasked token, a row of C entries, normalized on its own.
    expected, _, _ = _reference(norm, setup, x[mask], None)
    np.testing.assert_allclose(np.asarray(y)[mask], expected, **TOL["float32"])
    # Fully masked tokens have no statistics, and still a finite output.
    assert np.all(np.isfinite(np.asarray(y)[~mask]))


# --- Errors ----------------------------------------------------------------------


def _message(x_shape, mask_shape, *phrases):
    """A regex for a message that names both shapes and has each of `phrases`, in any order."""
    parts = [re.escape(str(tuple(x_shape))), re.escape(str(tuple(mask_shape))), *phrases]
    return "(?s)^" + "".join(f"(?=.*{part})" for part in parts)


def _raises(norm, interface, shape, feature_axis, mask):
    setup = _setup(norm, interface, shape, feature_axis)
    x = random_input(np.random.default_rng(4), shape)
    return setup.apply(setup.params, setup.state, x, mask)


REACHING = [
    ("NCHW-(N,H,W)", (3, 4, 5, 2), 1, (3, 5, 2)),
    ("NCHW-(N,C)", (3, 4, 5, 2), 1, (3, 4)),
    ("NCL-(N,C)", (3, 4, 5), 1, (3, 4)),
]
REACHING_CASES, REACHING_IDS = _cases(FEATURE_AXIS_NORMS, REACHING)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, mask_shape", REACHING_CASES, ids=REACHING_IDS
)
def test_lower_rank_mask_reaching_the_feature_axis_is_value_error_asking_for_x_rank(
    norm, interface, shape, feature_axis, mask_shape
):
    example = tuple(1 if a == feature_axis else n for a, n in enumerate(shape))
    message = _message(shape, mask_shape, rf"Give the mask `x`'s rank.*{re.escape(str(example))}")
    with pytest.raises(ValueError, match=message):
        _raises(norm, interface, shape, feature_axis, np.ones(mask_shape, bool))


HIGHER_RANK = [
    ("NC-(N,C,1)", (8, 4), -1, (8, 4, 1)),
    ("NHWC-(1,N,H,W,C)", (3, 5, 2, 4), -1, (1, 3, 5, 2, 4)),
]
HIGHER_RANK_CASES, HIGHER_RANK_IDS = _cases(NORMS, HIGHER_RANK)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, mask_shape", HIGHER_RANK_CASES, ids=HIGHER_RANK_IDS
)
def test_mask_of_higher_rank_than_x_is_value_error_naming_both_shapes(
    norm, interface, shape, feature_axis, mask_shape
):
    with pytest.raises(ValueError, match=_message(shape, mask_shape, "at most the rank of `x`")):
        _raises(norm, interface, shape, feature_axis, np.ones(mask_shape, bool))


# Sizes that fit no axis, or fit only when aligned with the trailing axes.
MISFITS = [
    ("NC-(7,)", (8, 4), -1, (7,)),
    ("NC-(C,)", (8, 4), -1, (4,)),
    ("NHWC-(W,C)", (3, 5, 2, 4), -1, (2, 4)),
    ("NHWC-(N,W)", (3, 5, 2, 4), -1, (3, 2)),
]
MISFIT_CASES, MISFIT_IDS = _cases(NORMS, MISFITS)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, mask_shape", MISFIT_CASES, ids=MISFIT_IDS
)
def test_mask_that_does_not_fit_is_value_error_naming_both_shapes(
    norm, interface, shape, feature_axis, mask_shape
):
    with pytest.raises(ValueError, match=_message(shape, mask_shape, "`mask` must broadcast")):
        _raises(norm, interface, shape, feature_axis, np.ones(mask_shape, bool))


VARYING = [
    ("NC-(N,C)", (8, 4), -1, (8, 4)),
    ("NHWC-(N,1,1,C)", (3, 5, 2, 4), -1, (3, 1, 1, 4)),
    ("NCHW-(N,C,1,1)", (3, 4, 5, 2), 1, (3, 4, 1, 1)),
]
VARYING_CASES, VARYING_IDS = _cases(FEATURE_AXIS_NORMS, VARYING)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, mask_shape", VARYING_CASES, ids=VARYING_IDS
)
def test_same_rank_mask_varying_along_the_feature_axis_is_value_error(
    norm, interface, shape, feature_axis, mask_shape
):
    message = _message(shape, mask_shape, "size 1 on the feature axis")
    with pytest.raises(ValueError, match=message):
        _raises(norm, interface, shape, feature_axis, np.ones(mask_shape, bool))


NON_BOOLEAN = [("float32", (8, 4), -1, np.float32), ("int32", (8, 4), -1, np.int32)]
NON_BOOLEAN_CASES, NON_BOOLEAN_IDS = _cases(NORMS, NON_BOOLEAN)


@pytest.mark.parametrize(
    "norm, interface, shape, feature_axis, dtype", NON_BOOLEAN_CASES, ids=NON_BOOLEAN_IDS
)
def test_non_boolean_mask_is_type_error(norm, interface, shape, feature_axis, dtype):
    with pytest.raises(TypeError, match=rf"`mask` must be boolean, got dtype {np.dtype(dtype)}"):
        _raises(norm, interface, shape, feature_axis, np.ones(shape[:1], dtype))
