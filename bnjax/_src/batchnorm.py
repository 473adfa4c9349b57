"""Batch Normalization as a pure function of params, running state and input."""

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from bnjax._src import checks, output, precise, stats
from bnjax._src.types import BatchStats, CollectedStats, NormParams


def batchnorm_init(
    num_features: int,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
) -> tuple[NormParams, BatchStats]:
    """Creates BatchNorm parameters and running statistics.

    Args:
      num_features: `C`, the size of the feature axis, a positive int.
      use_scale: learn a per-feature scale (initialized to 1). Default True.
      use_bias: learn a per-feature bias (initialized to 0). Default True.
      zero_centered_scale: store the scale as `g`, initialized to 0, which
        `batchnorm_apply(..., zero_centered_scale=True)` applies as `1 + g`.
        Default False.
      param_dtype: dtype of the parameters and of the running mean and
        variance. Default float32.

    Returns:
      `(params, state)`: `NormParams(scale, bias)` with fields of shape `(C,)`
      or `None`, and `BatchStats(mean=0, var=1, count=0)` with `mean` and
      `var` of shape `(C,)` and an int32 scalar `count`.

    Examples:
      >>> params, state = bnjax.batchnorm_init(3)
      >>> params.scale, state.count
      (Array([1., 1., 1.], dtype=float32), Array(0, dtype=int32))
    """
    checks.check_size("num_features", num_features)
    shape = (num_features,)
    params = NormParams(
        scale=output.initial_scale(shape, zero_centered_scale, param_dtype) if use_scale else None,
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
    state: BatchStats | CollectedStats,
    x: jax.Array,
    train: bool,
    *,
    axis: int = -1,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
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
    """Normalizes each feature of `x` with batch or running statistics.

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, per feature. In
    training mode `mean` and `var` (biased) are taken over every axis of `x`
    except the feature axis, and the running statistics are updated as
    `running = momentum * running + (1 - momentum) * batch` (note: PyTorch's
    `momentum` is `1 - momentum` here). In eval mode the running statistics
    are used and the state is returned unchanged. `scale` is `1 + g` for a
    zero-centered scale `g`; with `modulation=(s, t)`, `y * (1 + s) + t`
    follows, per example (FiLM, class-conditional BatchNorm).

    Args:
      params: `NormParams` from `batchnorm_init`, fields of shape `(C,)`.
      state: `BatchStats` from `batchnorm_init` or a previous call; or,
        inside `precise_batch_stats`, the `CollectedStats` it hands out
        (training mode only), which gets this call's batch moments pooled in.
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
        BatchNorm), pooled exactly in two all-reduces of O(C) values (see
        `docs/scaling.md`, "Synchronized BatchNorm"). Default None.
      mask: optional boolean array of entries that contribute to the
        statistics, by the one mask rule: of `x`'s rank it broadcasts by
        numpy's rules with size 1 on the feature axis (e.g. `(N, 1, H, W)`
        for NCHW); with fewer axes it is aligned with `x`'s leading axes and
        must stop before the feature axis (e.g. `(N,)` for `(N, C)` or
        `(N, H, W, C)`, `(N, H, W)` for NHWC). False entries do not
        contribute; their outputs are still computed.
        With `axis_name` every device's unmasked entries count equally. If
        no entry at all is unmasked, the running statistics and `count` are
        left as they were. Ignored in eval mode.
      virtual_batch_size: ghost BatchNorm: in training mode, normalize each
        group of this many consecutive examples (along axis 0) with the
        group's own statistics. The running statistics are updated once per
        call, with the count-weighted average of the groups' means and
        variances. Must divide the batch size. With `axis_name`, each
        device's groups are its own examples, and the running statistics
        average the groups of all devices (one collective). Default None
        (one group).
      unbiased_running_var: fold the unbiased variance `var * n / (n - 1)`
        into the running variance, `n` being the number of entries the batch
        variance was taken over (counted across `axis_name`; per group with
        `virtual_batch_size`), as PyTorch does. Normalization still uses the
        biased variance. With `momentum = 1 - torch_momentum` (see
        `bnjax.convert.from_torch_momentum`) training then matches
        `torch.nn.BatchNorm*d` step for step. Default False (biased, as
        numpy-ml, Flax and Keras).
      skip_nonfinite: if this batch's mean or variance has a NaN or an
        infinity, leave the running statistics and `count` as they were
        (observable as `new_state.count == state.count`), as for a fully
        masked batch; the output is still computed from the batch. One bad
        batch would otherwise poison the running statistics for good, and
        silently: they are only read in eval mode. The check is a reduction
        over `2 C` values. With `axis_name` every device sees the same pooled
        statistics, so all devices skip together. Default True; False lets
        non-finite values through.
      momentum_warmup: start the running statistics with the cumulative
        average while `count < 1 / (1 - momentum)` (the first 10 updates for
        `momentum=0.9`), then continue with the moving average, so the
        initial `mean=0`, `var=1` and the first batch do not dominate the
        running statistics for hundreds of steps. The update is
        `running = k / (k + 1) * running + 1 / (k + 1) * batch` for
        `k = count < 1 / (1 - momentum)`, and the moving average after.
        `momentum` must then be a Python number. No effect with
        `momentum=None`, which is the cumulative average throughout.
        Default False.
      zero_centered_scale: `params.scale` holds `g` and is applied as
        `1 + g`, in the statistics dtype (from
        `batchnorm_init(..., zero_centered_scale=True)`). Default False.
      modulation: optional `(scale, shift)` computed per example, e.g. from
        a class embedding: arrays of `x`'s rank, each axis 1 or `x`'s size
        (`(N, C)` for `(N, C)`, `(N, 1, 1, C)` for NHWC), applied after the
        learned affine as `y * (1 + scale) + shift`, in training and eval
        mode. Either may be None. The running statistics do not see it.
      dtype: the output dtype, floating. Default None: `x`'s dtype.

    Returns:
      `(y, new_state)`: `y` of `x`'s shape and of dtype `dtype` (computed in
      the statistics dtype and rounded once), and the updated `BatchStats`
      (`state` itself when `train=False`; a `CollectedStats` when given
      one). The batch statistics enter `new_state` without gradient.

    Raises:
      TypeError: `train` is not a Python bool (e.g. traced); `x`, `mask`,
        `modulation` or `dtype` has the wrong dtype; `momentum` is traced
        with `momentum_warmup=True`.
      ValueError: params or state do not have shape `(C,)`; `axis` is out of
        range; training with a single value per feature (counted across
        `axis_name`); `mask` or `modulation` is not broadcastable;
        `momentum` is outside
        [0, 1]; `epsilon <= 0`; `axis_name` is not bound;
        `virtual_batch_size` does not divide the batch; `train=False` with a
        `CollectedStats`.

    Examples:
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
      Hoffer, Hubara & Soudry 2017, Train longer, generalize better (ghost
      BatchNorm), arXiv:1705.08741.
    """
    feature_axis = check_inputs(params, state, x, train, axis, momentum, epsilon)
    checks.check_momentum_warmup(momentum, momentum_warmup)
    modulation = checks.check_modulation(modulation, x.shape, feature_axis)
    out_dtype = checks.check_output_dtype(dtype, x.dtype)
    if not train:
        y = normalize_with_running_stats(
            params, running_stats(state), x, feature_axis, epsilon, zero_centered_scale
        )
        return output.finish(y, modulation, out_dtype), state
    batch = batch_statistics(
        x,
        feature_axis,
        mask,
        axis_name,
        virtual_batch_size,
        unbiased_running_var,
        collecting=isinstance(state, CollectedStats),
    )
    scale = output.learned_scale(params.scale, zero_centered_scale, batch.mean.dtype)
    scale = stats.broadcast_to_axes(scale, batch.x.ndim, (batch.feature_axis,))
    bias = stats.broadcast_to_axes(params.bias, batch.x.ndim, (batch.feature_axis,))
    y = stats.normalize(batch.x, batch.mean, batch.var, scale, bias, epsilon)
    new_state = update_state(state, batch, momentum, skip_nonfinite, momentum_warmup)
    return output.finish(y.reshape(x.shape), modulation, out_dtype), new_state


class Batch(NamedTuple):
    """Training-mode statistics of a batch, shared with Batch Renormalization.

    Attributes:
      x: the input, reshaped to `(N // v, v, ...)` for ghost batches of `v`.
      feature_axis: the feature axis of `x` as reshaped.
      mean: the batch (or per-group) mean, broadcastable against `x`.
      var: the biased variance, same shape.
      contribution: what this batch folds into the running statistics:
        `mean` and `var` of shape `(C,)` (the count-weighted average over
        ghost groups and devices; `var` unbiased with
        `unbiased_running_var`), and `count`, an int32 scalar, the number
        of entries they were taken over.
      whole: the `Moments` (shape `(C,)`, biased) of the whole batch, all
        groups and devices pooled, which precise statistics collect; None
        when not collecting.
    """

    x: jax.Array
    feature_axis: int
    mean: jax.Array
    var: jax.Array
    contribution: stats.Moments
    whole: stats.Moments | None


def check_inputs(
    params: NormParams,
    state: BatchStats | CollectedStats,
    x: jax.Array,
    train: bool,
    axis: int,
    momentum: float | None,
    epsilon: float,
) -> int:
    """Checks BatchNorm's arguments; returns the non-negative feature axis."""
    checks.check_train(train)
    checks.check_floating(x)
    feature_axis = checks.check_feature_axis(axis, x.ndim)
    if isinstance(state, CollectedStats) and not train:
        raise ValueError(
            "`train` must be True when `state` holds `CollectedStats` (the layer is "
            "inside `precise_batch_stats`, which collects training-mode batch "
            "statistics), got False."
        )
    _check_params_and_state(params, running_stats(state), x.shape[feature_axis], feature_axis)
    checks.check_momentum(momentum)
    checks.check_epsilon(epsilon)
    return feature_axis


def running_stats(state: BatchStats | CollectedStats) -> BatchStats:
    """The layer's running statistics, also when precise statistics are being collected."""
    return state.running if isinstance(state, CollectedStats) else state


def normalize_with_running_stats(
    params: NormParams,
    state: BatchStats,
    x: jax.Array,
    feature_axis: int,
    epsilon: float,
    zero_centered_scale: bool,
) -> jax.Array:
    """Eval mode: `x` normalized with the running mean and variance, in the statistics dtype."""

    axes = (feature_axis,)
    scale = output.learned_scale(params.scale, zero_centered_scale, stats.stats_dtype(x.dtype))
    mean = stats.broadcast_to_axes(state.mean, x.ndim, axes)
    var = stats.broadcast_to_axes(state.var, x.ndim, axes)
    scale = stats.broadcast_to_axes(scale, x.ndim, axes)
    bias = stats.broadcast_to_axes(params.bias, x.ndim, axes)
    return stats.normalize(x, mean, var, scale, bias, epsilon)


def batch_statistics(
    x: jax.Array,
    feature_axis: int,
    mask: jax.Array | None,
    axis_name: stats.AxisName | None,
    virtual_batch_size: int | None,
    unbiased_running_var: bool,
    collecting: bool,
) -> Batch:
    """Statistics over every axis but the feature axis (per ghost group).

    `collecting` also computes the whole batch's moments (see `Batch.whole`).
    """
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, feature_axis)
    if virtual_batch_size is not None:
        checks.check_virtual_batch_size(virtual_batch_size, x.shape, feature_axis)
        x, mask = _split_batch(x, mask, virtual_batch_size)
        feature_axis += 1
    num_features = x.shape[feature_axis]

    def per_feature(m: stats.Moments) -> stats.Moments:
        return stats.Moments(
            m.mean.reshape(num_features), m.var.reshape(num_features), m.count.reshape(())
        )

    whole: stats.Moments | None
    if virtual_batch_size is None:
        reduced = tuple(a for a in range(x.ndim) if a != feature_axis)
        checks.check_values_per_feature(
            math.prod(x.shape[a] for a in reduced) * checks.mapped_axis_size(axis_name),
            x.shape,
            axis_name,
        )
        moments = stats.moments(x, reduced, mask=mask, axis_name=axis_name)
        whole = per_feature(moments)
        contribution = whole._replace(var=_unbiased(whole)) if unbiased_running_var else whole
    else:
        # Each group, on each device, is normalized with its own statistics.
        reduced = tuple(a for a in range(1, x.ndim) if a != feature_axis)
        checks.check_values_per_feature(
            math.prod(x.shape[a] for a in reduced), x.shape, axis_name=None
        )
        checks.mapped_axis_size(axis_name)
        moments = stats.moments(x, reduced, mask=mask)
        groups = moments._replace(var=_unbiased(moments)) if unbiased_running_var else moments
        contribution = per_feature(stats.pool(groups, (0,), axis_name, between_parts=False))
        whole = per_feature(stats.pool(moments, (0,), axis_name)) if collecting else None
    return Batch(x, feature_axis, moments.mean, moments.var, contribution, whole)


def _unbiased(moments: stats.Moments) -> jax.Array:
    """`var * n / (n - 1)`, with a single entry (`n = 1`, variance 0) left at 0."""
    n = moments.count.astype(moments.var.dtype)
    return moments.var * (n / jnp.maximum(n - 1, 1))


def _split_batch(
    x: jax.Array, mask: jax.Array | None, size: int
) -> tuple[jax.Array, jax.Array | None]:
    """`(N, ...)` to `(N // size, size, ...)`, and the mask alike."""
    x = x.reshape(x.shape[0] // size, size, *x.shape[1:])
    if mask is not None:
        leading = (1, 1) if mask.shape[0] == 1 else x.shape[:2]
        mask = mask.reshape(*leading, *mask.shape[1:])
    return x, mask


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


def update_state(
    state: BatchStats | CollectedStats,
    batch: Batch,
    momentum: float | None,
    skip_nonfinite: bool,
    momentum_warmup: bool,
) -> BatchStats | CollectedStats:
    """The state after a training step: running statistics updated, or moments collected."""
    if isinstance(state, CollectedStats):
        assert batch.whole is not None
        return precise.collect(state, batch.whole, _is_usable(batch.whole, skip_nonfinite))
    return update_running(state, batch.contribution, momentum, skip_nonfinite, momentum_warmup)


def update_running(
    state: BatchStats,
    contribution: stats.Moments,
    momentum: float | None,
    skip_nonfinite: bool,
    momentum_warmup: bool,
) -> BatchStats:
    """Folds one batch's statistics into the running ones, without gradient.

    `running = keep * running + take * batch`, with `(keep, take)` from
    `_update_weights`. A batch with no contributing entry, or (with
    `skip_nonfinite`) with non-finite statistics, leaves `state` as it was.
    """
    dtype = state.mean.dtype
    mean = lax.stop_gradient(contribution.mean).astype(dtype)
    var = lax.stop_gradient(contribution.var).astype(dtype)
    keep, take = _update_weights(state.count, momentum, momentum_warmup, dtype)
    new_state = BatchStats(
        (keep * state.mean + take * mean).astype(dtype),
        (keep * state.var + take * var).astype(dtype),
        state.count + jnp.int32(1),
    )
    usable = _is_usable(contribution, skip_nonfinite)
    updated: BatchStats = jax.tree.map(
        lambda new, old: jnp.where(usable, new, old), new_state, state
    )
    return updated


def _is_usable(contribution: stats.Moments, skip_nonfinite: bool) -> jax.Array:
    """Whether a batch may enter the running statistics: it has entries (and is finite)."""
    usable = contribution.count > 0
    if skip_nonfinite:
        usable &= jnp.isfinite(contribution.mean).all() & jnp.isfinite(contribution.var).all()
    return usable


def _update_weights(
    count: jax.Array, momentum: float | None, warmup: bool, dtype: jnp.dtype
) -> tuple[jax.Array | float, jax.Array | float]:
    """`(keep, take)`: the weights of the running value and of the batch in an update.

    The moving average keeps `momentum`; the cumulative average after `k =
    count` updates keeps `k / (k + 1)`, so that every batch ends up with the
    same weight (and the first one replaces the initial values exactly).
    With `warmup`, the cumulative average is used while
    `count < 1 / (1 - momentum)`.
    """
    updates = count.astype(dtype) + 1
    cumulative = (count.astype(dtype) / updates, 1 / updates)
    if momentum is None:
        return cumulative
    moving = (momentum, 1 - momentum)
    if not warmup:
        return moving
    if momentum == 1:  # 1 / (1 - momentum) is infinite: always below it
        return cumulative
    # `count < 1 / (1 - momentum)` for an integer count, computed exactly
    # from the momentum as written (0.9 -> 9/10 -> 10 warm-up updates; the
    # float 1 / (1 - 0.9) is 9.999999999999998).
    warmup_updates = math.ceil(1 / (1 - Fraction(repr(float(momentum)))))
    in_warmup = count < warmup_updates
    keep, take = (jnp.where(in_warmup, c, m) for c, m in zip(cumulative, moving, strict=True))
    return keep, take
