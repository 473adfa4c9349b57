"""JAX implementations: bnjax, the textbook version, the affine floor; the shared wrapper.

Every JAX library provides, per normalizer, a `ForwardBuilder`: a function of
the case's `Inputs` and `Op` that returns a `Forward`, the library's own call
with its inputs in the library's layout and dtypes. `jax_bench` turns it into
the timed, jit-compiled function of the op's mode, the same way for every
library: the forward itself, or `jax.vjp` of its output for fwd+bwd.

In NCHW rows (`Inputs.channels_first`) each forward takes NCHW arrays and
normalizes over axis 1, in the library's own channels-first form; a library
without one raises `NotApplicable` instead of being timed on NHWC.
"""

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from norm_cases import (
    EPSILON,
    MOMENTUM,
    NUM_GROUPS,
    RMS_EPSILON,
    Bench,
    Inputs,
    NotApplicable,
    Op,
    from_channels_first,
    to_channels_first,
)

R_MAX, D_MAX = 3.0, 5.0  # Batch Renorm's clipping bounds, bnjax's defaults
# How bnjax and the textbook version treat bfloat16 inputs.
NOTES = {
    "bnjax": "params and running statistics float32; statistics of bfloat16 input "
    "accumulated in float32 and the output (bfloat16, the input's dtype) rounded once",
    "naive": "x upcast to float32, params float32, y cast back to the input's dtype",
}
NCHW_NOTES = {
    "bnjax": "axis=1 on NCHW-contiguous arrays",
    "naive": "reduces over every axis but 1, params broadcast on axis 1",
    "floor": "x * a + b with a, b broadcast on axis 1",
}


class Forward(NamedTuple):
    """A library's forward call and its inputs, as the library takes them."""

    fn: Callable[..., tuple]  # fn(x, params, state) -> (y, *new running statistics)
    x: jax.Array
    params: tuple  # differentiated, in the order (scale, bias)
    state: Any = None  # not differentiated: running statistics, in the library's form
    channels_first: bool = False  # x and y are NCHW (N, C, H, W) instead of NHWC


ForwardBuilder = Callable[[Inputs, Op], Forward]


def jax_bench(forwards: dict[str, ForwardBuilder], inputs: Inputs, op: Op) -> Bench:
    """The jit-compiled call of `op` with one library's forward for `op.norm`."""
    if op.norm not in forwards:
        raise NotApplicable(f"no {op.norm}")
    forward = forwards[op.norm](inputs, op)
    if inputs.channels_first and not forward.channels_first:
        raise RuntimeError("an NHWC forward built for an NCHW row")
    args = (forward.x, forward.params, forward.state)
    fn = forward.fn
    if op.mode == "fwd+bwd":
        g = device_array(inputs.g, inputs.dtype, forward.channels_first)
        args, fn = (*args, g), _forward_and_backward(fn)
    jitted = jax.jit(fn)
    return Bench(
        run=lambda: jitted(*args),
        outputs=partial(canonical_outputs, channels_first=forward.channels_first),
    )


def _forward_and_backward(fn: Callable[..., tuple]) -> Callable[..., tuple]:
    """Gradients of `sum(y * g)` w.r.t. x and params, for `fn`'s output y."""

    def forward_and_backward(x, params, state, g):
        _, vjp = jax.vjp(lambda x, params: fn(x, params, state)[0], x, params)
        return vjp(g)

    return forward_and_backward


def canonical_outputs(outputs: Any, channels_first: bool) -> list[np.ndarray]:
    """float32 numpy arrays: the first (y or dx) NHWC, the others (per channel) flat."""
    first, *rest = [np.asarray(a, np.float32) for a in jax.tree.leaves(outputs)]
    first = from_channels_first(first) if channels_first else first
    return [first, *(a.reshape(-1) for a in rest)]


def device_array(values: np.ndarray, dtype: str, channels_first: bool = False) -> jax.Array:
    """`values` on the device in `dtype`, NCHW-contiguous if `channels_first`."""
    values = np.ascontiguousarray(to_channels_first(values) if channels_first else values)
    return jnp.asarray(values, dtype)


def per_channel(v: jax.Array, ndim: int, axis: int = -1) -> jax.Array:
    """A (C,) vector shaped to broadcast against data of rank `ndim`, C on `axis`."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _x(inputs: Inputs) -> jax.Array:
    """x on the device in the row's layout (NCHW-contiguous in NCHW rows)."""
    return device_array(inputs.x, inputs.dtype, inputs.channels_first)


def _params(inputs: Inputs) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(p) for p in inputs.params)


# --- bnjax -----------------------------------------------------------------


def bnjax_batchnorm(inputs: Inputs, op: Op, *, bnjax: Any, renorm: bool = False) -> Forward:
    """`bnjax.batchnorm_apply` (or `batchrenorm_apply`), params and state float32;
    `axis=1` in NCHW rows."""
    apply = bnjax.batchrenorm_apply if renorm else bnjax.batchnorm_apply
    state = bnjax.BatchStats(jnp.asarray(inputs.mean), jnp.asarray(inputs.var), jnp.int32(0))

    def fn(x, params, state):
        y, new = apply(
            bnjax.NormParams(*params),
            state,
            x,
            op.train,
            axis=inputs.channel_axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
        )
        return (y, new.mean, new.var) if op.train else (y,)

    return Forward(fn, _x(inputs), _params(inputs), state, inputs.channels_first)


def _bnjax_stateless(apply: Callable, bnjax: Any, inputs: Inputs, op: Op) -> Forward:
    """A stateless bnjax normalizer: `apply(NormParams, x, axis)`, C on `axis`."""

    def fn(x, params, state):
        scale, *bias = params
        params = bnjax.NormParams(scale, bias[0] if bias else None)
        return (apply(params, x, inputs.channel_axis),)

    return Forward(fn, _x(inputs), _params(inputs), None, inputs.channels_first)


def _bnjax_forwards(bnjax: Any) -> dict[str, ForwardBuilder]:
    def layernorm(params, x, axis):
        return bnjax.layernorm_apply(params, x, axis=axis, epsilon=EPSILON)

    def groupnorm(params, x, axis):
        return bnjax.groupnorm_apply(params, x, num_groups=NUM_GROUPS, axis=axis, epsilon=EPSILON)

    def rmsnorm(params, x, axis):
        return bnjax.rmsnorm_apply(params, x, axis=axis, epsilon=RMS_EPSILON)

    return {
        "batchnorm": partial(bnjax_batchnorm, bnjax=bnjax),
        "batchrenorm": partial(bnjax_batchnorm, bnjax=bnjax, renorm=True),
        "layernorm": partial(_bnjax_stateless, layernorm, bnjax),
        "groupnorm": partial(_bnjax_stateless, groupnorm, bnjax),
        "rmsnorm": partial(_bnjax_stateless, rmsnorm, bnjax),
    }


# --- naive: the textbook formulas with jnp.mean and jnp.var, in float32 ----


def _naive(fn: Callable[..., tuple], inputs: Inputs, op: Op) -> Forward:
    """A textbook forward on float32 copies of x, its output cast back to x's dtype.

    `fn(x, params, state, train, c)` normalizes with the channels on axis `c`.
    """

    def upcast(x, params, state):
        y, *stats = fn(x.astype(jnp.float32), params, state, op.train, inputs.channel_axis % x.ndim)
        return (y.astype(x.dtype), *stats)

    state = (jnp.asarray(inputs.mean), jnp.asarray(inputs.var))
    return Forward(upcast, _x(inputs), _params(inputs), state, inputs.channels_first)


def _all_but(ndim: int, *kept: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in kept)


def _naive_batchnorm(x, params, state, train, c):
    axes = _all_but(x.ndim, c)
    mean, var = (jnp.mean(x, axes), jnp.var(x, axes)) if train else state
    scale, bias = (per_channel(p, x.ndim, c) for p in params)
    y = (x - per_channel(mean, x.ndim, c)) / jnp.sqrt(per_channel(var, x.ndim, c) + EPSILON)
    y = y * scale + bias
    if not train:
        return (y,)
    return (
        y,
        MOMENTUM * state[0] + (1 - MOMENTUM) * mean,
        MOMENTUM * state[1] + (1 - MOMENTUM) * var,
    )


def _naive_batchrenorm(x, params, state, train, c):
    axes = _all_but(x.ndim, c)
    mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    sigma_batch, sigma = jnp.sqrt(var + EPSILON), jnp.sqrt(state[1] + EPSILON)
    r = jax.lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1 / R_MAX, R_MAX))
    d = jax.lax.stop_gradient(jnp.clip((mean - state[0]) / sigma, -D_MAX, D_MAX))
    scale, bias = (per_channel(p, x.ndim, c) for p in params)
    y = (x - per_channel(mean, x.ndim, c)) / per_channel(sigma_batch, x.ndim, c)
    y = (y * per_channel(r, x.ndim, c) + per_channel(d, x.ndim, c)) * scale + bias
    return (
        y,
        MOMENTUM * state[0] + (1 - MOMENTUM) * mean,
        MOMENTUM * state[1] + (1 - MOMENTUM) * var,
    )


def _naive_layernorm(x, params, state, train, c):
    mean, var = jnp.mean(x, c, keepdims=True), jnp.var(x, c, keepdims=True)
    scale, bias = (per_channel(p, x.ndim, c) for p in params)
    return ((x - mean) / jnp.sqrt(var + EPSILON) * scale + bias,)


def _naive_groupnorm(x, params, state, train, c):
    grouped = x.reshape(*x.shape[:c], NUM_GROUPS, -1, *x.shape[c + 1 :])
    axes = _all_but(grouped.ndim, 0, c)  # all but the batch and the group axes
    mean, var = jnp.mean(grouped, axes, keepdims=True), jnp.var(grouped, axes, keepdims=True)
    y = ((grouped - mean) / jnp.sqrt(var + EPSILON)).reshape(x.shape)
    scale, bias = (per_channel(p, x.ndim, c) for p in params)
    return (y * scale + bias,)


def _naive_rmsnorm(x, params, state, train, c):
    mean_square = jnp.mean(x * x, c, keepdims=True)
    return (x / jnp.sqrt(mean_square + RMS_EPSILON) * per_channel(params[0], x.ndim, c),)


NAIVE: dict[str, ForwardBuilder] = {
    "batchnorm": partial(_naive, _naive_batchnorm),
    "batchrenorm": partial(_naive, _naive_batchrenorm),
    "layernorm": partial(_naive, _naive_layernorm),
    "groupnorm": partial(_naive, _naive_groupnorm),
    "rmsnorm": partial(_naive, _naive_rmsnorm),
}


# --- the floor: a per-channel affine op, which reads x once and writes y once ---


def floor(inputs: Inputs, op: Op) -> Forward:
    """`x * a + b` (`x * a` for RMSNorm, which has no bias), cast to x's dtype, with
    `a` and `b` broadcast along the channels' axis (axis 1 in NCHW rows)."""
    axis = inputs.channel_axis

    def fn(x, params, state):
        y = x * per_channel(params[0], x.ndim, axis)
        if len(params) > 1:
            y = y + per_channel(params[1], x.ndim, axis)
        return (y.astype(x.dtype),)

    return Forward(fn, _x(inputs), _params(inputs), None, inputs.channels_first)


FLOOR: dict[str, ForwardBuilder] = {
    norm: floor for norm in ("batchnorm", "batchrenorm", "layernorm", "groupnorm", "rmsnorm")
}


def bnjax_bench(inputs: Inputs, op: Op, *, bnjax: Any = None) -> Bench:
    """bnjax's call of `op`: the installed bnjax, or another copy (see `load_baseline`)."""
    if bnjax is None:
        import bnjax
    return jax_bench(_bnjax_forwards(bnjax), inputs, op)


def load_baseline(source_dir: str) -> Any:
    """The bnjax package in `source_dir` (e.g. a `git worktree` of an older commit).

    It is imported beside the installed bnjax, so that both are timed in one
    run: the modules of each copy refer to their own siblings, and
    `sys.modules` is restored so that `import bnjax` keeps meaning the
    installed one.
    """
    import importlib
    import sys

    def bnjax_modules() -> dict[str, Any]:
        return {k: m for k, m in sys.modules.items() if k == "bnjax" or k.startswith("bnjax.")}

    installed = bnjax_modules()
    for name in installed:
        del sys.modules[name]
    sys.path.insert(0, source_dir)
    try:
        baseline = importlib.import_module("bnjax")
    finally:
        sys.path.remove(source_dir)
        for name in bnjax_modules():
            del sys.modules[name]
        sys.modules.update(installed)
    return baseline


def copy(inputs: Inputs, op: Op) -> Forward:
    """`y = x * 1`: a same-size copy, the roofline of a memory-bound op."""
    return Forward(
        lambda x, params, state: (x * 1,), _x(inputs), _params(inputs), None, inputs.channels_first
    )


COPY: dict[str, ForwardBuilder] = {norm: copy for norm in FLOOR}
