"""Root-mean-square Normalization as a pure function of params and input."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src import checks, layernorm, stats
from bnjax._src.types import NormParams


def rmsnorm_init(
    feature_shape: int | Sequence[int],
    *,
    use_scale: bool = True,
    param_dtype: Any = jnp.float32,
) -> NormParams:
    """Creates RMSNorm parameters: a scale and no bias.

    Args:
      feature_shape: the sizes of the normalized axes, in increasing axis
        order (an int for one axis).
      use_scale: learn a scale per normalized position (initialized to 1).
        Default True.
      param_dtype: dtype of the scale. Default float32.

    Returns:
      `NormParams(scale, bias=None)`, `scale` of shape `feature_shape` or `None`.

    Example:
      >>> bnjax.rmsnorm_init(8).bias is None
      True
    """
    return layernorm.layernorm_init(
        feature_shape, use_scale=use_scale, use_bias=False, param_dtype=param_dtype
    )


def rmsnorm_apply(
    params: NormParams,
    x: jax.Array,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Divides each example by its root mean square over the axes `axis`.

    `y = x / sqrt(mean(x**2) + epsilon) * scale`, the mean taken per example
    over the normalized axes. No mean is subtracted and there is no bias.

    Args:
      params: `NormParams` from `rmsnorm_init(feature_shape)`; `scale` of the
        normalized axes' shape or `None`. A bias, if present, is added.
      x: floating input of any rank. The mean square of bfloat16/float16
        inputs is accumulated in float32; the output has `x`'s dtype.
      axis: the normalized axes, an int or a tuple of ints. Default -1.
      epsilon: added to the mean square, > 0. Default 1e-6.
      mask: optional boolean array of entries that contribute to the mean
        square, by the one mask rule (see `layernorm_apply`).

    Returns:
      `y`, of `x`'s shape and dtype.

    Raises:
      TypeError: `x` or `mask` has the wrong dtype.
      ValueError: `axis` is out of range or repeated; `scale` does not have
        the normalized axes' shape; `mask` is not broadcastable;
        `epsilon <= 0`.

    Example:
      >>> params = bnjax.rmsnorm_init(2)
      >>> bnjax.rmsnorm_apply(params, jnp.array([[3.0, -3.0]])).round(3)
      Array([[ 1., -1.]], dtype=float32)

    References:
      Zhang & Sennrich 2019, Root Mean Square Layer Normalization,
      arXiv:1910.07467.
    """
    axes = layernorm.check_inputs(params, x, axis, epsilon)
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, None)
    mean_square = stats.mean_square(x, axes, mask=mask)
    dtype = mean_square.dtype
    # Scaling by the per-example factor before the per-feature scale (rather
    # than by their full-size product) saves autodiff two passes over `x`.
    y = x.astype(dtype) * lax.rsqrt(mean_square + epsilon)
    if params.scale is not None:
        y = y * stats.broadcast_to_axes(params.scale, x.ndim, axes).astype(dtype)
    if params.bias is not None:
        y = y + stats.broadcast_to_axes(params.bias, x.ndim, axes).astype(dtype)
    return y.astype(x.dtype)
