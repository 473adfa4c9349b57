"""Batch Normalization as a pure function of params, running state and input."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._src import checks, stats
from bnjax._src.types import BatchStats, NormParams


def batchnorm_init(
    num_features: int,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    param_dtype: Any = jnp.float32,
) -> tuple[NormParams, BatchStats]:
    """Creates BatchNorm parameters and running statistics.

    Args:
      num_features: `C`, the size of the feature axis, a positive int.
      use_scale: learn a per-feature scale (initialized to 1). Default True.
      use_bias: learn a per-feature bias (initialized to 0). Default True.
      param_dtype: dtype of the parameters and of the running mean and
        variance. Default float32.

    Returns:
      `(params, state)`: `NormParams(scale, bias)` with fields of shape `(C,)`
      or `None`, and `BatchStats(mean=0, var=1, count=0)` with `mean` and
      `var` of shape `(C,)` and an int32 scalar `count`.

    Example:
      >>> params, state = bnjax.batchnorm_init(3)
      >>> params.scale, state.count
      (Array([1., 1., 1.], dtype=float32), Array(0, dtype=int32))
    """
    checks.check_size("num_features", num_features)
    shape = (num_features,)
    params = NormParams(
        scale=jnp.ones(shape, param_dtype) if use_scale else None,
        bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    )
    state = BatchStats(
        mean=jnp.zeros(shape, param_dtype),
        var=jnp.ones(shape, param_dtype),
        count=jnp.zeros((), jnp.int32),
    )
    return params, state


def batchnorm_apply(
    params: NormParams,
    state: BatchStats,
    x: jax.Array,
    train: bool,
    *,
    axis: int = -1,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
    axis_name: stats.AxisName | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, BatchStats]:
    """Normalizes each feature of `x` with batch or running statistics.

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, per feature. In
    training mode `mean` and `var` (biased) are taken over every axis of `x`
    except the feature axis, and the running statistics are updated as
    `running = momentum * running + (1 - momentum) * batch` (note: PyTorch's
    `momentum` is `1 - momentum` here). In eval mode the running statistics
    are used and the state is returned unchanged.

    Args:
      params: `NormParams` from `batchnorm_init`, fields of shape `(C,)`.
      state: `BatchStats` from `batchnorm_init` or a previous call.
      x: floating input of any rank >= 1 whose `axis` has size `C`, e.g.
        `(N, C)`, `(N, T, C)`, `(N, H, W, C)`, `(N, D, H, W, C)`. Statistics
        of bfloat16/float16 inputs are accumulated in float32; `y` has `x`'s
        dtype.
      train: Python bool, static under `jax.jit`: True to normalize with this
        batch's statistics and update the running ones.
      axis: the feature axis. Default -1 (channels last); `axis=1` for NCHW.
      momentum: weight of the old running value, in [0, 1]. Default 0.9.
        `None` keeps the plain average of all batch statistics seen so far,
        each training call weighted equally (driven by `state.count`).
      epsilon: added to the variance, > 0. Default 1e-5.
      axis_name: a mapped axis name (or tuple of names) of an enclosing
        `shard_map`, `vmap(..., axis_name=...)` or `pmap`. The statistics are
        then those of the whole batch across that axis (synchronized
        BatchNorm), computed exactly in one collective. Default None.
      mask: optional boolean array, broadcastable (numpy rules) to `x`'s shape
        without its feature axis, e.g. `(N,)` for `(N, C)` inputs or
        `(N, 1, 1)` for `(N, H, W, C)`. False entries do not contribute to
        the statistics; their outputs are still computed. With `axis_name`
        every device's unmasked entries count equally. If no entry at all is
        unmasked, the running statistics and `count` are left as they were.
        Ignored in eval mode.

    Returns:
      `(y, new_state)`: `y` of `x`'s shape and dtype, and the updated
      `BatchStats` (`state` itself when `train=False`). The batch statistics
      enter `new_state` without gradient.

    Raises:
      TypeError: `train` is not a Python bool (e.g. traced); `x` or `mask`
        has the wrong dtype.
      ValueError: params or state do not have shape `(C,)`; `axis` is out of
        range; training with a single value per feature (counted across
        `axis_name`); `mask` is not broadcastable; `momentum` is outside
        [0, 1]; `epsilon <= 0`; `axis_name` is not bound.

    Example:
      >>> params, state = bnjax.batchnorm_init(2)
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> y, state = bnjax.batchnorm_apply(params, state, x, True)
      >>> y.round(4)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> state.mean, state.var, state.count
      (Array([0.2, 0.4], dtype=float32), Array([1. , 1.3], dtype=float32), Array(1, dtype=int32))

    References:
      Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167.
    """
    checks.check_train(train)
    checks.check_floating(x)
    feature_axis = checks.check_feature_axis(axis, x.ndim)
    num_features = x.shape[feature_axis]
    _check_params_and_state(params, state, num_features, feature_axis)
    checks.check_momentum(momentum)
    checks.check_epsilon(epsilon)

    if not train:
        y = _normalize(x, state.mean, state.var, params, feature_axis, epsilon)
        return y, state

    reduced = tuple(a for a in range(x.ndim) if a != feature_axis)
    per_feature = int(np.prod([x.shape[a] for a in reduced]))
    checks.check_values_per_feature(
        per_feature * checks.mapped_axis_size(axis_name), x.shape, axis_name
    )
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, feature_axis)
    batch = stats.moments(x, reduced, mask=mask, axis_name=axis_name)
    mean = batch.mean.reshape(num_features)
    var = batch.var.reshape(num_features)
    y = _normalize(x, mean, var, params, feature_axis, epsilon)
    return y, _update_running(state, mean, var, batch.count, momentum)


def _check_params_and_state(
    params: NormParams, state: BatchStats, num_features: int, feature_axis: int
) -> None:
    what = f"`x.shape[{feature_axis}]` = {num_features}"
    expected = (num_features,)
    checks.check_param_shape("params.scale", params.scale, expected, what)
    checks.check_param_shape("params.bias", params.bias, expected, what)
    checks.check_param_shape("state.mean", state.mean, expected, what)
    checks.check_param_shape("state.var", state.var, expected, what)
    checks.check_param_shape("state.count", state.count, (), "a scalar")


def _normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    params: NormParams,
    feature_axis: int,
    epsilon: float,
) -> jax.Array:
    def expand(v: jax.Array | None) -> jax.Array | None:
        return stats.broadcast_to_axes(v, x.ndim, (feature_axis,))

    return stats.normalize(
        x, expand(mean), expand(var), expand(params.scale), expand(params.bias), epsilon
    )


def _update_running(
    state: BatchStats,
    mean: jax.Array,
    var: jax.Array,
    count: int | jax.Array,
    momentum: float | None,
) -> BatchStats:
    """Folds one batch's statistics into the running ones, without gradient."""
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    dtype = state.mean.dtype
    if momentum is None:
        # Cumulative average: after k + 1 updates each batch has weight 1 / (k + 1).
        weight = 1.0 / (state.count.astype(dtype) + 1)
        new_mean = state.mean + weight * (mean.astype(dtype) - state.mean)
        new_var = state.var + weight * (var.astype(dtype) - state.var)
    else:
        new_mean = momentum * state.mean + (1 - momentum) * mean.astype(dtype)
        new_var = momentum * state.var + (1 - momentum) * var.astype(dtype)
    new_state = BatchStats(
        new_mean.astype(dtype), new_var.astype(dtype), state.count + jnp.int32(1)
    )
    if isinstance(count, int):
        return new_state
    # A batch whose entries are all masked out carries no statistics.
    seen = jnp.reshape(count, -1)[0] > 0
    return jax.tree.map(lambda new, old: jnp.where(seen, new, old), new_state, state)
