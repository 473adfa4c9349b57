"""Every normalizer at the sizes users have, against float64 references.

Each statistic here is taken over at least 1024 entries (LayerNorm and
RMSNorm rows of 4096 and 8192), in each layout that takes its own path
through `bnjax._src.stats`:

* rows, the reduced axes trailing: LayerNorm and RMSNorm, NCHW GroupNorm
  and InstanceNorm;
* columns: NHWC BatchNorm and Batch Renorm (one reduction over the merged
  `N * H * W` axis);
* two stages pooled by `stats.pool`: NCHW BatchNorm (the `H * W` rows first
  when they are the larger block, the batch axis first otherwise), NHWC
  GroupNorm and InstanceNorm (`H * W` per channel, then a group's channels);
* masks of `x`'s rank and of lower rank (aligned with the leading axes),
  their first entry False, so a shift taken from a masked entry shows;
* synchronized BatchNorm across the 8 CPU devices of `conftest.py`
  (`shard_map`), and a batch laid out over an explicit mesh under `jit` (the
  shift of the unmasked statistics is then gathered from the sharded axis).

Outputs, running statistics and gradients of `sum(y * cotangent)` are
compared with the float64 formulas of `references` (the gradients in closed
form), for float32 and bfloat16 inputs; `check_grads` checks derivatives to
second order in float64; the large-mean case and constant inputs pin the
numerics. Each compiled function is built once and shared by the tests that
read its results.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bnjax
from tests import helpers, references
from tests.helpers import f64
from tests.tolerances import (
    CHECK_GRADS_TOL,
    FINITE_DIFFERENCE_TOL,
    LARGE_MEAN_OFFSET_TOL,
    LARGE_MEAN_TOL,
    ONE_ENTRY_JVP_TOL,
    REAL_SIZE_GRAD_TOL,
    REAL_SIZE_TOL,
)

MOMENTUM = 0.9
# Training calls per run of a BatchNorm-like case (one for the stateless).
NUM_STEPS = 3
NUM_DEVICES = 8
# Far outside the data: a statistic that lets a masked entry in is far off.
GARBAGE = 1e6
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Case(NamedTuple):
    """One normalizer on one layout.

    `options` are the keyword arguments of the `*_apply` call (`axis`,
    `num_groups`); `mask_shape` follows SPEC's mask rule for that layout.
    """

    norm: str
    shape: tuple[int, ...]
    mask_shape: tuple[int, ...]
    options: dict


CASES = {
    # 1024 per feature; a per-position mask of lower rank.
    "batchnorm-NHWC": Case("batchnorm", (4, 16, 16, 8), (4, 16, 16), {}),
    # Rows of H * W = 256 reduced first, then the 4 rows pooled.
    "batchnorm-NCHW-rows-first": Case("batchnorm", (4, 8, 16, 16), (4, 1, 16, 16), {"axis": 1}),
    # The batch axis (64) reduced first, then the 16 positions pooled.
    "batchnorm-NCHW-batch-first": Case("batchnorm", (64, 8, 4, 4), (64,), {"axis": 1}),
    # A per-example mask broadcast over H and W inside one reduction.
    "batchrenorm-NHWC": Case("batchrenorm", (4, 16, 16, 8), (4,), {}),
    "batchrenorm-NCHW": Case("batchrenorm", (64, 8, 4, 4), (64, 1, 1, 1), {"axis": 1}),
    "layernorm-4096": Case("layernorm", (8, 4096), (8, 4096), {}),
    "layernorm-8192": Case("layernorm", (4, 8192), (4, 8192), {}),
    # numpy-ml's LayerNorm2D: (H, W, C) = 4096 per example; a per-position mask.
    "layernorm-HWC": Case("layernorm", (4, 16, 16, 16), (4, 16, 16), {"axis": (1, 2, 3)}),
    "rmsnorm-4096": Case("rmsnorm", (8, 4096), (8, 4096), {}),
    "rmsnorm-8192": Case("rmsnorm", (4, 8192), (4, 8192), {}),
    # 8 groups of 4 channels: 16 * 16 * 4 = 1024 entries per example and group.
    "groupnorm-NHWC": Case("groupnorm", (4, 16, 16, 32), (4, 16, 16), {"num_groups": 8}),
    "groupnorm-NCHW": Case(
        "groupnorm", (4, 32, 16, 16), (4, 1, 16, 16), {"num_groups": 8, "axis": 1}
    ),
    # 32 * 32 = 1024 entries per example and channel.
    "instancenorm-NHWC": Case("instancenorm", (4, 32, 32, 8), (4, 32, 32), {}),
    "instancenorm-NCHW": Case("instancenorm", (4, 8, 32, 32), (4, 1, 32, 32), {"axis": 1}),
}
STATEFUL = ("batchnorm", "batchrenorm")
# Batch Renorm's limits: tight enough that some features' r and d are clipped
# and others' are not (the running statistics start near the batch's).
RENORM_LIMITS = {"r_max": 1.1, "d_max": 0.1}

# (case, dtype, masked): every case in float32 with and without a mask; in
# bfloat16 every normalizer on one or two layouts, masks on some of them
# (each bfloat16 run costs a compilation, and the statistics are float32).
BFLOAT16_RUNS = [
    ("batchnorm-NHWC", True),
    ("batchnorm-NCHW-rows-first", False),
    ("batchrenorm-NCHW", True),
    ("layernorm-4096", False),
    ("layernorm-8192", True),
    ("rmsnorm-8192", True),
    ("groupnorm-NHWC", False),
    ("instancenorm-NHWC", True),
]
RUNS = [(c, "float32", m) for c in CASES for m in (False, True)] + [
    (c, "bfloat16", m) for c, m in BFLOAT16_RUNS
]
RUN_IDS = [f"{c}-{d}-{'masked' if m else 'unmasked'}" for c, d, m in RUNS]
STATEFUL_RUNS = [r for r in RUNS if CASES[r[0]].norm in STATEFUL]
STATEFUL_RUN_IDS = [i for r, i in zip(RUNS, RUN_IDS, strict=True) if r in STATEFUL_RUNS]


# --- the calls under test ----------------------------------------------------------


def _param_shape(case):
    """The shape of the case's `scale` and `bias`."""
    return tuple(case.shape[a] for a in _param_axes(case))


def _param_axes(case):
    """The axes of `x` that the parameters are laid out over (sorted, non-negative)."""
    ndim = len(case.shape)
    if case.norm in ("layernorm", "rmsnorm"):
        axis = case.options.get("axis", -1)
        return tuple(sorted(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,))))
    return (case.options.get("axis", -1) % ndim,)


def _apply(case, params, state, x, mask):
    """`(y, new_state)` of the case's normalizer; `new_state` is None for the stateless."""
    if case.norm == "batchnorm":
        return bnjax.batchnorm_apply(params, state, x, True, mask=mask, **case.options)
    if case.norm == "batchrenorm":
        return bnjax.batchrenorm_apply(
            params, state, x, True, mask=mask, **RENORM_LIMITS, **case.options
        )
    fn = {
        "layernorm": bnjax.layernorm_apply,
        "rmsnorm": bnjax.rmsnorm_apply,
        "groupnorm": bnjax.groupnorm_apply,
        "instancenorm": bnjax.instancenorm_apply,
    }[case.norm]
    return fn(params, x, mask=mask, **case.options), None


@functools.cache
def _compiled_step(case_id):
    """One jitted training call: `((loss, (y, new_state)), (dparams, dx))`.

    The loss is `sum(y * cotangent)`, taken in float32 whatever `y`'s dtype,
    so that the gradient with respect to `y` is the cotangent itself.
    """
    case = CASES[case_id]

    def loss(params, x, state, mask, cotangent):
        y, new_state = _apply(case, params, state, x, mask)
        return jnp.sum(y.astype(jnp.float32) * cotangent), (y, new_state)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


# --- inputs ------------------------------------------------------------------------


def _input(rng, shape, param_axes):
    """O(1) values, not centred, whose mean differs by example and by parameter position."""
    x = helpers.random_examples(rng, shape).astype(np.float64)
    offsets_shape = [n if a in param_axes else 1 for a, n in enumerate(shape)]
    return x + rng.uniform(-2.0, 2.0, offsets_shape)


def _full_mask(mask, ndim):
    """`mask` at `x`'s rank: a lower-rank mask aligns with the leading axes."""
    return None if mask is None else mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _with_garbage(x, mask):
    """`x` with every masked entry replaced by GARBAGE."""
    return np.where(np.broadcast_to(_full_mask(mask, x.ndim), x.shape), x, GARBAGE)


def _rounded(a, dtype):
    """`a` rounded to `dtype`, back in float64: the values bnjax and the reference both see."""
    return np.asarray(jnp.asarray(a, dtype), np.float64)


def _initial_state(rng, case, x, mask):
    """Running statistics near, not at, those of the batch `x` (None for the stateless)."""
    if case.norm not in STATEFUL:
        return None
    axis = _param_axes(case)[0]
    _, mean, var = references.batchnorm(x, None, None, axis=axis, mask=_full_mask(mask, x.ndim))
    c = case.shape[axis]
    return bnjax.BatchStats(
        jnp.asarray(mean + 0.3 * rng.normal(size=c), jnp.float32),
        jnp.asarray(var * rng.uniform(0.7, 1.4, c), jnp.float32),
        jnp.zeros((), jnp.int32),
    )


# --- float64 references ------------------------------------------------------------


class Expected(NamedTuple):
    """The float64 reference of one training call (gradients of `sum(y * cotangent)`)."""

    y: np.ndarray
    dx: np.ndarray
    dscale: np.ndarray
    dbias: np.ndarray | None
    mean: np.ndarray | None  # the batch statistics, BatchNorm-like cases only
    var: np.ndarray | None


def _reference(case, params, x, mask, cotangent, running):
    """The float64 `Expected`; `running` is (mean, var) before the call, or None."""
    scale = f64(params.scale)
    bias = f64(params.bias)
    mask = _full_mask(mask, x.ndim)
    axes = _param_axes(case)
    if case.norm == "batchnorm":
        y, mean, var = references.batchnorm(x, scale, bias, axis=axes[0], mask=mask)
        grads = references.batchnorm_grads(x, scale, cotangent, axis=axes[0], mask=mask)
        return Expected(y, *grads, mean, var)
    if case.norm == "batchrenorm":
        y, mean, var, r, d = references.batchrenorm(
            x, scale, bias, *running, axis=axes[0], mask=mask, **RENORM_LIMITS
        )
        grads = references.batchnorm_grads(x, scale, cotangent, axis=axes[0], mask=mask, r=r, d=d)
        return Expected(y, *grads, mean, var)
    if case.norm == "layernorm":
        y = references.layernorm(x, scale, bias, axes=axes, mask=mask)
        grads = references.layernorm_grads(x, scale, cotangent, axes=axes, mask=mask)
        return Expected(y, *grads, None, None)
    if case.norm == "rmsnorm":
        y = references.rmsnorm(x, scale, axes=axes, mask=mask)
        dx, dscale = references.rmsnorm_grads(x, scale, cotangent, axes=axes, mask=mask)
        return Expected(y, dx, dscale, None, None, None)
    groups = case.options.get("num_groups", case.shape[axes[0]])
    y = references.groupnorm(x, scale, bias, num_groups=groups, axis=axes[0], mask=mask)
    grads = references.groupnorm_grads(
        x, scale, cotangent, num_groups=groups, axis=axes[0], mask=mask
    )
    return Expected(y, *grads, None, None)


class Step(NamedTuple):
    """One training call of bnjax (outputs as float64 numpy) and its expectation."""

    y: np.ndarray
    dx: np.ndarray
    dparams: bnjax.NormParams
    state: bnjax.BatchStats | None  # after the call
    expected: Expected


class Run(NamedTuple):
    initial_state: bnjax.BatchStats | None
    steps: list[Step]


@functools.cache
def _run(case_id, dtype_name, masked, garbage=False):
    """Training calls of the case on fresh batches, the state threaded through.

    `garbage` puts GARBAGE in every masked entry of `x`.
    """
    case = CASES[case_id]
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(list(CASES).index(case_id))
    axes = _param_axes(case)
    params = helpers.random_params(rng, _param_shape(case))
    if case.norm == "rmsnorm":
        params = params._replace(bias=None)
    step = _compiled_step(case_id)
    state = initial_state = running = None
    steps = []
    for i in range(NUM_STEPS if case.norm in STATEFUL else 1):
        x = _rounded(_input(rng, case.shape, axes), dtype)
        mask = helpers.random_mask(rng, case.mask_shape) if masked else None
        if garbage:
            x = _with_garbage(x, mask)
        # bfloat16-exact, so that the cotangent bnjax sees is the reference's.
        cotangent = _rounded(rng.normal(size=case.shape), jnp.bfloat16)
        if i == 0:
            state = initial_state = _initial_state(rng, case, x, mask)
            running = None if state is None else (f64(state.mean), f64(state.var))
        expected = _reference(case, params, x, mask, cotangent, running)
        (_, (y, state)), (dparams, dx) = step(
            params, jnp.asarray(x, dtype), state, mask, jnp.asarray(cotangent, jnp.float32)
        )
        assert y.dtype == dtype and dx.dtype == dtype
        if state is not None:
            running = references.running_stats(
                [expected.mean], [expected.var], MOMENTUM, mean=running[0], var=running[1]
            )
        steps.append(Step(f64(y), f64(dx), jax.tree.map(f64, dparams), state, expected))
    return Run(initial_state, steps)


def _assert_relative_to_largest(got, want, tol):
    """Equal up to `tol` times the largest entry of `want` (see REAL_SIZE_GRAD_TOL)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


# --- the closed-form gradients themselves ----------------------------------------

# Small float64 cases of every normalizer, masked (first entry False): the
# closed forms of `references` against central differences of its forward.
SMALL_CASES = {
    "batchnorm": Case("batchnorm", (5, 3, 4), (5, 3), {}),
    "batchrenorm": Case("batchrenorm", (5, 4, 3), (5, 1, 1), {"axis": 1}),
    "layernorm": Case("layernorm", (3, 4, 5), (3, 4), {"axis": (1, 2)}),
    "rmsnorm": Case("rmsnorm", (3, 7), (3, 7), {}),
    "groupnorm": Case("groupnorm", (2, 3, 3, 4), (2, 3, 3), {"num_groups": 2}),
}


@pytest.mark.parametrize("case_id", list(SMALL_CASES))
def test_reference_gradients_match_central_differences(case_id):
    case = SMALL_CASES[case_id]
    rng = np.random.default_rng(800)
    x = _input(rng, case.shape, _param_axes(case))
    params = helpers.random_params(rng, _param_shape(case))
    mask = helpers.random_mask(rng, case.mask_shape)
    cotangent = rng.normal(size=case.shape)
    axis = _param_axes(case)[0]
    running = (rng.normal(size=case.shape[axis]), rng.uniform(0.5, 2.0, case.shape[axis]))
    full_mask = _full_mask(mask, x.ndim)
    # Batch Renorm's r and d are held out of the gradient: fixed at x's.
    _, _, _, r, d = references.batchrenorm(
        x, None, None, *running, axis=axis, mask=full_mask, **RENORM_LIMITS
    )

    def loss(x, scale, bias):
        if case.norm == "batchrenorm":
            y = references.batchrenorm(
                x, scale, bias, *running, axis=axis, mask=full_mask, r=r, d=d
            )[0]
        else:
            params = bnjax.NormParams(scale, None if case.norm == "rmsnorm" else bias)
            y = _reference(case, params, x, mask, cotangent, running).y
        return np.sum(y * cotangent)

    args = [x, f64(params.scale), f64(params.bias)]
    want = _reference(case, bnjax.NormParams(*args[1:]), x, mask, cotangent, running)
    step = 1e-6
    for i, expected in enumerate((want.dx, want.dscale, want.dbias)):
        if expected is None:
            continue
        differences = np.empty_like(args[i])
        for j in range(args[i].size):
            shifted = [a.copy() for a in args]
            shifted[i].flat[j] += step
            up = loss(*shifted)
            shifted[i].flat[j] -= 2 * step
            differences.flat[j] = (up - loss(*shifted)) / (2 * step)
        np.testing.assert_allclose(expected, differences, **FINITE_DIFFERENCE_TOL)


# --- outputs, gradients and running statistics ------------------------------------


@pytest.mark.parametrize("case_id, dtype_name, masked", RUNS, ids=RUN_IDS)
def test_output_matches_float64_reference(case_id, dtype_name, masked):
    for step in _run(case_id, dtype_name, masked).steps:
        np.testing.assert_allclose(step.y, step.expected.y, **REAL_SIZE_TOL[dtype_name])


@pytest.mark.parametrize("case_id, dtype_name, masked", RUNS, ids=RUN_IDS)
def test_gradients_match_closed_form_float64_reference(case_id, dtype_name, masked):
    tol = REAL_SIZE_GRAD_TOL[dtype_name]
    for step in _run(case_id, dtype_name, masked).steps:
        want = step.expected
        _assert_relative_to_largest(step.dx, want.dx, tol["dx"])
        _assert_relative_to_largest(step.dparams.scale, want.dscale, tol["dparams"])
        if want.dbias is not None:
            _assert_relative_to_largest(step.dparams.bias, want.dbias, tol["dparams"])


def _expected_running_stats(run):
    """The closed-form running mean and variance after `run`'s steps, from its initial state."""
    return references.running_stats(
        [step.expected.mean for step in run.steps],
        [step.expected.var for step in run.steps],
        MOMENTUM,
        mean=f64(run.initial_state.mean),
        var=f64(run.initial_state.var),
    )


@pytest.mark.parametrize("case_id, dtype_name, masked", STATEFUL_RUNS, ids=STATEFUL_RUN_IDS)
def test_running_statistics_follow_closed_form_after_several_steps(case_id, dtype_name, masked):
    """`running = m * running + (1 - m) * batch` from the initial state, once per call."""
    run = _run(case_id, dtype_name, masked)

    mean, var = _expected_running_stats(run)
    final = run.steps[-1].state
    np.testing.assert_allclose(final.mean, mean, **REAL_SIZE_TOL["float32"])
    np.testing.assert_allclose(final.var, var, **REAL_SIZE_TOL["float32"])
    assert final.count.dtype == jnp.int32 and int(final.count) == NUM_STEPS


@pytest.mark.parametrize("case_id", list(CASES))
def test_garbage_in_masked_entries_does_not_reach_the_statistics(case_id):
    """Masked entries hold 1e6; every output (theirs too) is still the reference's."""
    run = _run(case_id, "float32", True, garbage=True)

    for step in run.steps:
        np.testing.assert_allclose(step.y, step.expected.y, **REAL_SIZE_TOL["float32"])
    if run.initial_state is not None:
        mean, var = _expected_running_stats(run)
        np.testing.assert_allclose(run.steps[-1].state.mean, mean, **REAL_SIZE_TOL["float32"])
        np.testing.assert_allclose(run.steps[-1].state.var, var, **REAL_SIZE_TOL["float32"])


# --- the large-mean case (SPEC: std within 1e-3 of 1) --------------------------------

# Mean 1e4 and std 1 in float32, >= 4096 unmasked entries per statistic. The
# masked entries hold GARBAGE; a per-example mask leaves out example 0 only.
LARGE_MEAN_CASES = {
    "batchnorm-NHWC": Case("batchnorm", (4, 32, 32, 4), (), {}),
    # Rows first: the first of the rows pooled is empty.
    "batchnorm-NCHW-rows-first-masked": Case("batchnorm", (6, 4, 32, 32), (6,), {"axis": 1}),
    "batchnorm-NCHW-batch-first": Case("batchnorm", (256, 4, 4, 4), (), {"axis": 1}),
    "layernorm-4096": Case("layernorm", (4, 4096), (), {}),
    "layernorm-8192-masked": Case("layernorm", (4, 8192), (4, 8192), {}),
    # 2 groups of 4 channels: 32 * 32 * 4 = 4096 per example and group.
    "groupnorm-NHWC": Case("groupnorm", (4, 32, 32, 8), (), {"num_groups": 2}),
    # 2 groups of 8 channels, about 80% of the entries unmasked.
    "groupnorm-NCHW-masked": Case(
        "groupnorm", (4, 16, 32, 32), (4, 1, 32, 32), {"num_groups": 2, "axis": 1}
    ),
}


def _large_mean_mask(rng, mask_shape):
    if not mask_shape:
        return None
    if len(mask_shape) == 1:
        return np.arange(mask_shape[0]) > 0
    return helpers.random_mask(rng, mask_shape, fraction=0.8)


def _statistic_blocks(case, a):
    """`a` as (statistics, entries): one row per mean and variance the normalizer takes."""
    axis = _param_axes(case)[0]
    if case.norm == "batchnorm":
        return np.moveaxis(a, axis, 0).reshape(case.shape[axis], -1)
    if case.norm == "layernorm":
        return a.reshape(a.shape[0], -1)
    # GroupNorm: channels last, split into groups, then (example, group) first.
    last = np.moveaxis(a, axis, -1)
    groups = case.options["num_groups"]
    grouped = last.reshape(a.shape[0], -1, groups, last.shape[-1] // groups)
    return np.moveaxis(grouped, 2, 1).reshape(a.shape[0] * groups, -1)


@pytest.mark.parametrize("case_id", list(LARGE_MEAN_CASES))
def test_large_mean_comes_out_with_unit_std(case_id):
    case = LARGE_MEAN_CASES[case_id]
    rng = np.random.default_rng(100 + list(LARGE_MEAN_CASES).index(case_id))
    mask = _large_mean_mask(rng, case.mask_shape)
    x = 1e4 + rng.normal(size=case.shape)
    if mask is not None:
        x = _with_garbage(x, mask)
    shape = _param_shape(case)
    params = bnjax.NormParams(jnp.ones(shape), jnp.zeros(shape))
    state = bnjax.batchnorm_init(shape[0])[1] if case.norm == "batchnorm" else None

    y, _ = jax.jit(functools.partial(_apply, case))(params, state, x.astype(np.float32), mask)

    counts = np.ones(x.shape, bool) if mask is None else _full_mask(mask, x.ndim)
    kept = _statistic_blocks(case, np.broadcast_to(counts, x.shape))
    assert kept.sum(axis=1).min() >= 4096
    for values, keep in zip(_statistic_blocks(case, f64(y)), kept, strict=True):
        assert abs(values[keep].std() - 1) <= LARGE_MEAN_TOL
        assert abs(values[keep].mean()) <= LARGE_MEAN_OFFSET_TOL


# --- a constant input gives the bias, exactly -------------------------------------------

# Constants near 1e4, a different one per channel. Pooling parts with equal
# means must give that mean to the last bit: an ulp off (1e-3) is multiplied
# by 1 / sqrt(epsilon) ~ 300 in the output. Pools of 6 and 3 parts, which
# (unlike powers of 2) do not divide out exactly.
CONSTANT_CASES = {
    # 6 rows of 16 * 16 pooled per channel; a per-example mask.
    "batchnorm-NCHW-rows-first": Case("batchnorm", (6, 8, 16, 16), (6,), {"axis": 1}),
    # 8 groups of 3 channels, each 32 * 32, pooled per example and group.
    "groupnorm-NHWC": Case("groupnorm", (2, 32, 32, 24), (2, 32, 32), {"num_groups": 8}),
}
CONSTANT_RUNS = [(c, m) for c in CONSTANT_CASES for m in (False, True)]
CONSTANT_RUN_IDS = [f"{c}-{'masked' if m else 'unmasked'}" for c, m in CONSTANT_RUNS]


@pytest.mark.parametrize("case_id, masked", CONSTANT_RUNS, ids=CONSTANT_RUN_IDS)
def test_constant_input_gives_bias(case_id, masked):
    case = CONSTANT_CASES[case_id]
    rng = np.random.default_rng(600)
    axis = _param_axes(case)[0]
    if case.norm == "batchnorm":
        values = rng.uniform(7e3, 1.3e4, [n if a == axis else 1 for a, n in enumerate(case.shape)])
    else:
        # One constant per example and group, in each of the group's channels.
        groups = case.options["num_groups"]
        values = rng.uniform(7e3, 1.3e4, (case.shape[0], 1, 1, groups))
        values = values.repeat(case.shape[axis] // groups, axis=axis)
    x = np.broadcast_to(values, case.shape).astype(np.float32)
    mask = helpers.random_mask(rng, case.mask_shape) if masked else None
    params = helpers.random_params(rng, _param_shape(case))
    state = bnjax.batchnorm_init(case.shape[axis])[1] if case.norm == "batchnorm" else None

    y, _ = jax.jit(functools.partial(_apply, case))(params, state, x, mask)

    bias = np.broadcast_to(
        np.asarray(params.bias).reshape([n if a == axis else 1 for a, n in enumerate(x.shape)]),
        x.shape,
    )
    np.testing.assert_allclose(f64(y), bias, **REAL_SIZE_TOL["float32"])


# --- the derivative with respect to one entry -------------------------------------

# 8192 entries per statistic (columns: the shift is the first entry). The
# Jacobian's off-diagonal entries, -scale / (n sigma) * (1 + xhat_i xhat_0),
# are O(1 / n); a shift that carried a derivative would add 1 - n / n to the
# mean's, whose rounding (~eps32) is ~n eps32 of a 1 / n result.
ONE_ENTRY_CASES = {
    "batchnorm-NHWC": Case("batchnorm", (8, 32, 32, 4), (), {}),
    # 2 groups of 8 channels of 32 * 32, pooled per example and group.
    "groupnorm-NHWC": Case("groupnorm", (2, 32, 32, 16), (), {"num_groups": 2}),
}


@pytest.mark.parametrize("case_id", list(ONE_ENTRY_CASES))
def test_derivative_along_one_entry_matches_float64_differences(case_id):
    """Forward mode along the first entry of every channel, against float64
    central differences of the reference."""
    case = ONE_ENTRY_CASES[case_id]
    rng = np.random.default_rng(700)
    x = _input(rng, case.shape, _param_axes(case)).astype(np.float32)
    params = helpers.random_params(rng, _param_shape(case))
    state = bnjax.batchnorm_init(case.shape[-1])[1] if case.norm == "batchnorm" else None
    tangent = np.zeros(case.shape, np.float32)
    tangent[0, 0, 0, :] = 1

    def apply(x):
        return _apply(case, params, state, x, None)[0]

    _, y_dot = jax.jit(lambda x, t: jax.jvp(apply, (x,), (t,)))(x, tangent)

    step = 1e-4

    def reference(x):
        return _reference(case, params, x, None, np.zeros(case.shape), None).y

    x, tangent = f64(x), f64(tangent)
    expected = (reference(x + step * tangent) - reference(x - step * tangent)) / (2 * step)
    off_diagonal = tangent == 0
    _assert_relative_to_largest(f64(y_dot)[off_diagonal], expected[off_diagonal], ONE_ENTRY_JVP_TOL)
    np.testing.assert_allclose(
        f64(y_dot)[~off_diagonal], expected[~off_diagonal], rtol=ONE_ENTRY_JVP_TOL
    )


# --- synchronized BatchNorm across 8 devices ------------------------------------------

# (whole-batch shape, feature axis, mask shape): 1024 entries per feature in
# all, 128 per device; the batch axis is split over the devices.
SYNC_CASES = {
    "NHWC": ((64, 4, 4, 8), -1, (64, 4, 4)),
    # Per device (8, 8, 4, 4): rows first, pooled over the batch axis, then across devices.
    "NCHW": ((64, 8, 4, 4), 1, (64,)),
}
SYNC_RUNS = [(layout, masked) for layout in SYNC_CASES for masked in (False, True)]
SYNC_RUN_IDS = [f"{layout}-{'masked' if m else 'unmasked'}" for layout, m in SYNC_RUNS]


@functools.cache
def _mesh():
    return jax.make_mesh((NUM_DEVICES,), ("data",))


def _sync_apply(layout, masked):
    """Synchronized BatchNorm under `shard_map`: `(params, state, x[, mask]) -> (y, new_state)`."""
    _, axis, _ = SYNC_CASES[layout]

    def per_device(params, state, x, *mask):
        return bnjax.batchnorm_apply(
            params, state, x, True, axis=axis, axis_name="data", mask=mask[0] if mask else None
        )

    in_specs = (P(), P(), P("data")) + ((P("data"),) if masked else ())
    return jax.shard_map(per_device, mesh=_mesh(), in_specs=in_specs, out_specs=(P("data"), P()))


@functools.cache
def _sync_step(layout, masked):
    """Jitted `((loss, (y, new_state)), (dparams, dx))` of synchronized BatchNorm."""
    mapped = _sync_apply(layout, masked)

    def loss(params, x, state, cotangent, *mask):
        y, new_state = mapped(params, state, x, *mask)
        return jnp.sum(y * cotangent), (y, new_state)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _sync_input(rng, shape, axis):
    """Like `_input`, and each device's block of examples offset by a different amount."""
    x = _input(rng, shape, (axis % len(shape),))
    offsets = np.repeat(np.linspace(-3.0, 3.0, NUM_DEVICES), shape[0] // NUM_DEVICES)
    return (x + offsets.reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)


@functools.cache
def _sync_run(layout, masked):
    """Two synchronized training calls, and their float64 whole-batch expectations."""
    shape, axis, mask_shape = SYNC_CASES[layout]
    rng = np.random.default_rng(200 + list(SYNC_CASES).index(layout))
    params = helpers.random_params(rng, (shape[axis],))
    initial_state = bnjax.batchnorm_init(shape[axis])[1]
    split = NamedSharding(_mesh(), P("data"))
    # Replicated, as the new state comes back: both calls share one compilation.
    state = jax.device_put(initial_state, NamedSharding(_mesh(), P()))
    steps = []
    with jax.set_mesh(_mesh()):
        for _ in range(2):
            x = _sync_input(rng, shape, axis)
            mask = helpers.random_mask(rng, mask_shape) if masked else None
            cotangent = rng.normal(size=shape).astype(np.float32)
            placed = [jax.device_put(a, split) for a in (x, cotangent)]
            masks = [jax.device_put(mask, split)] if masked else []
            (_, (y, state)), (dparams, dx) = _sync_step(layout, masked)(
                params, placed[0], state, placed[1], *masks
            )
            full = _full_mask(mask, x.ndim)
            y_ref, mean, var = references.batchnorm(
                x, params.scale, params.bias, axis=axis, mask=full
            )
            grads = references.batchnorm_grads(x, params.scale, cotangent, axis=axis, mask=full)
            expected = Expected(y_ref, *grads, mean, var)
            steps.append(Step(f64(y), f64(dx), jax.tree.map(f64, dparams), state, expected))
    return Run(initial_state, steps)


@pytest.mark.parametrize("layout, masked", SYNC_RUNS, ids=SYNC_RUN_IDS)
def test_synchronized_output_matches_whole_batch_float64_reference(layout, masked):
    for step in _sync_run(layout, masked).steps:
        np.testing.assert_allclose(step.y, step.expected.y, **REAL_SIZE_TOL["float32"])


@pytest.mark.parametrize("layout, masked", SYNC_RUNS, ids=SYNC_RUN_IDS)
def test_synchronized_running_statistics_are_the_whole_batch_ones(layout, masked):
    run = _sync_run(layout, masked)

    mean, var = references.running_stats(
        [step.expected.mean for step in run.steps],
        [step.expected.var for step in run.steps],
        MOMENTUM,
    )
    final = run.steps[-1].state
    np.testing.assert_allclose(final.mean, mean, **REAL_SIZE_TOL["float32"])
    np.testing.assert_allclose(final.var, var, **REAL_SIZE_TOL["float32"])
    assert int(final.count) == len(run.steps)


@pytest.mark.parametrize("layout, masked", SYNC_RUNS, ids=SYNC_RUN_IDS)
def test_synchronized_gradients_match_whole_batch_float64_reference(layout, masked):
    tol = REAL_SIZE_GRAD_TOL["float32"]
    for step in _sync_run(layout, masked).steps:
        _assert_relative_to_largest(step.dx, step.expected.dx, tol["dx"])
        _assert_relative_to_largest(step.dparams.scale, step.expected.dscale, tol["dparams"])
        _assert_relative_to_largest(step.dparams.bias, step.expected.dbias, tol["dparams"])


@pytest.mark.parametrize("layout", list(SYNC_CASES))
def test_synchronized_large_mean_comes_out_with_unit_std(layout):
    """Mean 1e4, std 1, 4096 entries per feature over the 8 devices; the first
    device's first examples are masked out and hold GARBAGE."""
    shape, axis, _ = SYNC_CASES[layout]
    shape = (shape[0] * 5, *shape[1:])
    rng = np.random.default_rng(300)
    mask = np.ones(shape[0], bool)
    mask[:4] = False
    x = _with_garbage(1e4 + rng.normal(size=shape), mask).astype(np.float32)
    params, state = bnjax.batchnorm_init(shape[axis])
    split = NamedSharding(_mesh(), P("data"))

    with jax.set_mesh(_mesh()):
        y, _ = jax.jit(_sync_apply(layout, True))(
            params, state, jax.device_put(x, split), jax.device_put(mask, split)
        )

    y = np.moveaxis(np.asarray(y, np.float64)[mask], axis, -1).reshape(-1, shape[axis])
    assert y.shape[0] >= 4096
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=0, atol=LARGE_MEAN_TOL)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, rtol=0, atol=LARGE_MEAN_OFFSET_TOL)


# --- a batch laid out over an explicit mesh, under jit -------------------------------

# (shape, feature axis): the batch axis is split over the 8 devices, and the
# shift of the unmasked statistics is gathered from it.
EXPLICIT_CASES = {"NC": ((2048, 8), -1), "NCHW-batch-first": ((256, 8, 2, 2), 1)}


@pytest.mark.parametrize("layout", list(EXPLICIT_CASES))
def test_batch_sharded_over_an_explicit_mesh_matches_float64_reference(layout):
    shape, axis = EXPLICIT_CASES[layout]
    rng = np.random.default_rng(400)
    x = _input(rng, shape, (axis % len(shape),)).astype(np.float32)
    params = helpers.random_params(rng, (shape[axis],))
    state = bnjax.batchnorm_init(shape[axis])[1]
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))

    def apply(params, state, x):
        return bnjax.batchnorm_apply(params, state, x, True, axis=axis)

    with jax.set_mesh(mesh):
        y, new_state = jax.jit(apply)(
            params, state, jax.device_put(x, NamedSharding(mesh, P("data")))
        )

    expected, mean, var = references.batchnorm(x, params.scale, params.bias, axis=axis)
    np.testing.assert_allclose(np.asarray(y), expected, **REAL_SIZE_TOL["float32"])
    mean, var = references.running_stats([mean], [var], MOMENTUM)
    np.testing.assert_allclose(new_state.mean, mean, **REAL_SIZE_TOL["float32"])
    np.testing.assert_allclose(new_state.var, var, **REAL_SIZE_TOL["float32"])


# --- derivatives to second order, float64 --------------------------------------------

# (normalizer, x shape, options): >= 1024 entries per statistic, small enough
# that check_grads' eight derivatives compile and run in a few seconds.
CHECK_GRADS_CASES = {
    "batchnorm": Case("batchnorm", (64, 16, 3), (), {}),
    "layernorm": Case("layernorm", (3, 1024), (), {}),
    "rmsnorm": Case("rmsnorm", (3, 1024), (), {}),
    # 2 groups of 16 channels: 8 * 8 * 16 = 1024 per example and group, two stages.
    "groupnorm-NHWC": Case("groupnorm", (2, 8, 8, 32), (), {"num_groups": 2}),
}


@pytest.fixture
def quick_compile():
    """Most XLA optimizations off, restored after: the cost of check_grads of
    order 2 is compiling its derivatives. Values change by float64 rounding only."""
    flag = "jax_disable_most_optimizations"
    old = jax.config.values[flag]
    jax.config.update(flag, True)
    yield
    jax.config.update(flag, old)


@pytest.mark.parametrize("case_id", list(CHECK_GRADS_CASES))
def test_derivatives_match_finite_differences_to_second_order(case_id, x64, quick_compile):
    case = CHECK_GRADS_CASES[case_id]
    rng = np.random.default_rng(500)
    axes = _param_axes(case)
    params = helpers.random_params(rng, _param_shape(case), np.float64)
    if case.norm == "rmsnorm":
        params = params._replace(bias=None)
    state = None
    if case.norm == "batchnorm":
        state = bnjax.batchnorm_init(case.shape[-1], param_dtype=jnp.float64)[1]
    x = jnp.asarray(_input(rng, case.shape, axes))
    weights = jnp.asarray(rng.normal(size=case.shape))

    def loss(params, x):
        y, _ = _apply(case, params, state, x, None)
        # tanh makes the second derivatives of the loss depend on y's.
        return jnp.sum(jnp.tanh(y) * weights)

    check_grads(jax.jit(loss), (params, x), order=2, modes=("fwd", "rev"), **CHECK_GRADS_TOL)
