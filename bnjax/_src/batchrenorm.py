"""Batch Renormalization as a pure function of params, running state and input."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from bnjax._src import batchnorm, checks, output, stats
from bnjax._src.types import BatchStats, CollectedStats, NormParams


def batchrenorm_apply(
    params: NormParams,
    state: BatchStats | CollectedStats,
    x: jax.Array,
    train: bool,
    *,
    axis: int = -1,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis_name: stats.AxisName | None = None,
    mask: jax.Array | None = None,
    virtual_batch_size: int | None = None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
    momentum_warmup: bool = False,
    zero_centered_scale: bool = False,
    modulation: output.Modulation | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, BatchStats | CollectedStats]:
    """BatchNorm corrected towards the running statistics (Ioffe 2017, Alg. 1).

    In training mode, with batch statistics `mean_B`, `var_B` over every axis
    but the feature axis, `sigma_B = sqrt(var_B + epsilon)` and
    `sigma = sqrt(running_var + epsilon)`:
    `r = clip(sigma_B / sigma, 1 / r_max, r_max)`,
    `d = clip((mean_B - running_mean) / sigma, -d_max, d_max)`, both from the
    running statistics before this step's update and held out of the
    gradient, and `y = ((x - mean_B) / sigma_B * r + d) * scale + bias`. The
    running statistics are then updated as BatchNorm's:
    `running = momentum * running + (1 - momentum) * batch`. With `r_max=1`
    and `d_max=0` this is BatchNorm. Eval mode is BatchNorm's eval mode.
    `scale` is `1 + g` for a zero-centered `g`; with `modulation=(s, t)`,
    `y * (1 + s) + t` follows, per example.

    Args:
      params: `NormParams` from `batchnorm_init`, fields of shape `(C,)`.
      state: `BatchStats` from `batchnorm_init` or a previous call (or a
        `CollectedStats`, as in `batchnorm_apply`).
      x: floating input whose `axis` has size `C`; see `batchnorm_apply`.
      train: Python bool, static under `jax.jit`.
      axis: the feature axis. Default -1.
      momentum: weight of the old running value, in [0, 1], or None for the
        cumulative average. Default 0.9.
      epsilon: added to the variances, > 0. Default 1e-5.
      r_max: bound of the scale correction `r`, >= 1. Default 3.0.
      d_max: bound of the shift correction `d`, >= 0. Default 5.0.
      axis_name: synchronize the batch statistics across this mapped axis,
        as in `batchnorm_apply`. Default None.
      mask: optional boolean mask of contributing entries, by the one mask
        rule (see `batchnorm_apply`). Default None.
      virtual_batch_size: ghost batches, as in `batchnorm_apply`; `r` and `d`
        are then per group. Default None.
      unbiased_running_var: fold `var * n / (n - 1)` into the running
        variance, as in `batchnorm_apply`. Default False.
      skip_nonfinite: leave the running statistics and `count` as they were
        when this batch's statistics are not finite, as in `batchnorm_apply`.
        Default True.
      momentum_warmup: the cumulative average while
        `count < 1 / (1 - momentum)`, then the moving average, as in
        `batchnorm_apply`. Default False.
      zero_centered_scale: `params.scale` holds `g`, applied as `1 + g`.
        Default False.
      modulation: optional per-example `(scale, shift)`, as in
        `batchnorm_apply`. Default None.
      dtype: the output dtype, floating. Default None: `x`'s dtype.

    Returns:
      `(y, new_state)` as in `batchnorm_apply`.

    Raises:
      TypeError, ValueError: as `batchnorm_apply`, and ValueError when
        `r_max < 1` or `d_max < 0`.

    Examples:
      >>> params, state = bnjax.batchnorm_init(2)
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> y, state = bnjax.batchrenorm_apply(params, state, x, True, r_max=1.0, d_max=0.0)
      >>> y.round(4)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)

    References:
      Ioffe 2017, Batch Renormalization, arXiv:1702.03275.
    """
    feature_axis = batchnorm.check_inputs(params, state, x, train, axis, momentum, epsilon)
    checks.check_renorm_limits(r_max, d_max)
    checks.check_momentum_warmup(momentum, momentum_warmup)
    modulation = checks.check_modulation(modulation, x.shape, feature_axis)
    out_dtype = checks.check_output_dtype(dtype, x.dtype)
    if not train:
        y = batchnorm.normalize_with_running_stats(
            params, batchnorm.running_stats(state), x, feature_axis, epsilon, zero_centered_scale
        )
        return output.finish(y, modulation, out_dtype), state
    batch = batchnorm.batch_statistics(
        x,
        feature_axis,
        mask,
        axis_name,
        virtual_batch_size,
        unbiased_running_var,
        collecting=isinstance(state, CollectedStats),
    )
    running = batchnorm.running_stats(state)

    def expand(v: jax.Array) -> jax.Array:
        return stats.broadcast_to_axes(v, batch.x.ndim, (batch.feature_axis,))

    dtype = batch.mean.dtype
    sigma = jnp.sqrt(expand(running.var).astype(dtype) + epsilon)
    sigma_batch = jnp.sqrt(batch.var + epsilon)
    r = lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1 / r_max, r_max))
    d = (batch.mean - expand(running.mean).astype(dtype)) / sigma
    d = lax.stop_gradient(jnp.clip(d, -d_max, d_max))
    # ((x - mean) / sigma_B * r + d) * scale + bias, as one normalization.
    scale = output.learned_scale(params.scale, zero_centered_scale, dtype)
    scale = jnp.ones((), dtype) if scale is None else expand(scale)
    bias = jnp.zeros((), dtype) if params.bias is None else expand(params.bias).astype(dtype)
    y = stats.normalize(batch.x, batch.mean, batch.var, scale * r, bias + scale * d, epsilon)
    new_state = batchnorm.update_state(state, batch, momentum, skip_nonfinite, momentum_warmup)
    return output.finish(y.reshape(x.shape), modulation, out_dtype), new_state
