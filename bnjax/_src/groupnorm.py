"""Group and Instance Normalization as pure functions of params and input."""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from bnjax._src import checks, output, stats
from bnjax._src.types import NormParams


def groupnorm_init(
    num_features: int,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
) -> NormParams:
    """Creates GroupNorm (or InstanceNorm) parameters.

    Args:
      num_features: `C`, the size of the channel axis, a positive int.
      use_scale: learn a per-channel scale (initialized to 1). Default True.
      use_bias: learn a per-channel bias (initialized to 0). Default True.
      zero_centered_scale: store the scale as `g`, initialized to 0, which
        the apply functions given `zero_centered_scale=True` apply as
        `1 + g`. Default False.
      param_dtype: dtype of the parameters. Default float32.

    Returns:
      `NormParams(scale, bias)`, each of shape `(C,)` or `None`.

    Examples:
      >>> bnjax.groupnorm_init(64).scale.shape
      (64,)
    """
    checks.check_size("num_features", num_features)
    shape = (num_features,)
    return NormParams(
        scale=output.initial_scale(shape, zero_centered_scale, param_dtype) if use_scale else None,
        bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    )


def groupnorm_apply(
    params: NormParams,
    x: jax.Array,
    *,
    num_groups: int = 32,
    axis: int = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    zero_centered_scale: bool = False,
    modulation: output.Modulation | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Normalizes each example over groups of channels.

    The channels of the `axis` axis are split into `num_groups` contiguous
    blocks (channel `c` is in group `c // (C // num_groups)`). For each
    example (axis 0) and group, `mean` and the biased `var` are taken over
    all non-batch axes within the group, and
    `y = (x - mean) / sqrt(var + epsilon) * scale + bias` with per-channel
    `scale` (`1 + g` for a zero-centered `g`) and `bias`. With
    `modulation=(s, t)`, `y * (1 + s) + t` follows, per example (FiLM,
    class-conditional GANs). There is no running state.

    Args:
      params: `NormParams` from `groupnorm_init(C)`, fields of shape `(C,)`.
      x: floating input of rank >= 2, batch axis first, e.g. `(N, H, W, C)`.
        Statistics of bfloat16/float16 inputs are accumulated in float32;
        the output has `x`'s dtype.
      num_groups: number of groups, dividing `C`. Default 32. `1` is
        LayerNorm over all non-batch axes with per-channel affine; `C` is
        InstanceNorm.
      axis: the channel axis, not 0. Default -1 (NHWC); `axis=1` for NCHW.
      epsilon: added to the variance, > 0. Default 1e-5.
      mask: optional boolean array of entries that contribute to the
        statistics, by the one mask rule: of `x`'s rank it broadcasts by
        numpy's rules with size 1 on the channel axis; with fewer axes it is
        aligned with `x`'s leading axes and must stop before the channel
        axis (e.g. `(N,)`, or `(N, H, W)` for NHWC). False entries do not
        contribute; their outputs are still computed.
      zero_centered_scale: `params.scale` holds `g` and is applied as
        `1 + g`, in the statistics dtype. Default False.
      modulation: optional per-example `(scale, shift)`: arrays of `x`'s
        rank, each axis 1 or `x`'s size (`(N, 1, 1, C)` for NHWC,
        `(N, C, 1, 1)` for NCHW), applied after the learned affine as
        `y * (1 + scale) + shift`. Either may be None.
      dtype: the output dtype, floating. Default None: `x`'s dtype.

    Returns:
      `y`, of `x`'s shape and of dtype `dtype`, computed in the statistics
      dtype and rounded once.

    Raises:
      TypeError: `x`, `mask`, `modulation` or `dtype` has the wrong dtype.
      ValueError: params do not have shape `(C,)`; `axis` is out of range or
        0; `num_groups` does not divide `C`; `mask` or `modulation` is not
        broadcastable; `epsilon <= 0`.

    Examples:
      >>> params = bnjax.groupnorm_init(4)
      >>> x = jnp.array([[[1.0, 3.0, 0.0, 0.0], [3.0, 1.0, 4.0, 4.0]]])
      >>> bnjax.groupnorm_apply(params, x, num_groups=2).round(3)
      Array([[[-1.,  1., -1., -1.],
              [ 1., -1.,  1.,  1.]]], dtype=float32)

    References:
      Wu & He 2018, Group Normalization, arXiv:1803.08494.
    """
    checks.check_floating(x)
    channel_axis = checks.check_channel_axis(axis, x.ndim)
    num_channels = x.shape[channel_axis]
    checks.check_num_groups(num_groups, num_channels)
    checks.check_epsilon(epsilon)
    what = f"`x.shape[{channel_axis}]` = {num_channels}"
    checks.check_param_shape("params.scale", params.scale, (num_channels,), what)
    checks.check_param_shape("params.bias", params.bias, (num_channels,), what)
    modulation = checks.check_modulation(modulation, x.shape, channel_axis)
    out_dtype = checks.check_output_dtype(dtype, x.dtype)
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, channel_axis)
        mask = mask.reshape(*mask.shape[: channel_axis + 1], 1, *mask.shape[channel_axis + 1 :])

    # Splitting the channel axis in place is a free reshape: no transpose.
    grouped_shape = (
        *x.shape[:channel_axis],
        num_groups,
        num_channels // num_groups,
        *x.shape[channel_axis + 1 :],
    )
    grouped = x.reshape(grouped_shape)
    reduced = tuple(a for a in range(1, grouped.ndim) if a != channel_axis)
    moments = stats.moments(grouped, reduced, mask=mask)

    def expand(p: jax.Array | None) -> jax.Array | None:
        if p is None:
            return None
        p = p.reshape(num_groups, num_channels // num_groups)
        return stats.broadcast_to_axes(p, grouped.ndim, (channel_axis, channel_axis + 1))

    scale = output.learned_scale(params.scale, zero_centered_scale, moments.mean.dtype)
    y = stats.normalize(
        grouped, moments.mean, moments.var, expand(scale), expand(params.bias), epsilon
    )
    return output.finish(y.reshape(x.shape), modulation, out_dtype)


def instancenorm_apply(
    params: NormParams,
    x: jax.Array,
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    zero_centered_scale: bool = False,
    modulation: output.Modulation | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Normalizes each channel of each example over its other axes.

    GroupNorm with one channel per group: for each example (axis 0) and
    channel, `mean` and the biased `var` are taken over all other axes, and
    `y = (x - mean) / sqrt(var + epsilon) * scale + bias` per channel.

    Args:
      params: `NormParams` from `groupnorm_init(C)`.
      x: floating input of rank >= 2, batch axis first, e.g. `(N, H, W, C)`.
      axis: the channel axis, not 0. Default -1; `axis=1` for NCHW.
      epsilon: added to the variance, > 0. Default 1e-5.
      mask: optional boolean mask of contributing entries, as in
        `groupnorm_apply`.
      zero_centered_scale: `params.scale` holds `g`, applied as `1 + g`.
        Default False.
      modulation: optional per-example `(scale, shift)`, as in
        `groupnorm_apply`. Default None.
      dtype: the output dtype, floating. Default None: `x`'s dtype.

    Returns:
      `y`, of `x`'s shape and of dtype `dtype`.

    Raises:
      TypeError, ValueError: as `groupnorm_apply`.

    Examples:
      >>> params = bnjax.groupnorm_init(2)
      >>> x = jnp.array([[[1.0, 0.0], [3.0, 4.0]]])
      >>> bnjax.instancenorm_apply(params, x).round(3)
      Array([[[-1., -1.],
              [ 1.,  1.]]], dtype=float32)

    References:
      Ulyanov, Vedaldi & Lempitsky 2016, Instance Normalization,
      arXiv:1607.08022.
    """
    checks.check_floating(x)
    num_channels = x.shape[checks.check_channel_axis(axis, x.ndim)]
    return groupnorm_apply(
        params,
        x,
        num_groups=num_channels,
        axis=axis,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        modulation=modulation,
        dtype=dtype,
    )
