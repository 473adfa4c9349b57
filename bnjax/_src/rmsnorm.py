"""Root-mean-square Normalization as a pure function of params and input."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from bnjax._src import checks, layernorm, output, stats
from bnjax._src.types import NormParams


def rmsnorm_init(
    feature_shape: int | Sequence[int],
    *,
    use_scale: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
) -> NormParams:
    """Creates RMSNorm parameters: a scale and no bias.

    Args:
      feature_shape: the sizes of the normalized axes, in increasing axis
        order (an int for one axis).
      use_scale: learn a scale per normalized position (initialized to 1).
        Default True.
      zero_centered_scale: store the scale as `g`, initialized to 0, which
        `rmsnorm_apply(..., zero_centered_scale=True)` applies as `1 + g`
        (Gemma's RMSNorm). Default False.
      param_dtype: dtype of the scale. Default float32.

    Returns:
      `NormParams(scale, bias=None)`, `scale` of shape `feature_shape` or `None`.

    Examples:
      >>> bnjax.rmsnorm_init(8).bias is None
      True
    """
    return layernorm.layernorm_init(
        feature_shape,
        use_scale=use_scale,
        use_bias=False,
        zero_centered_scale=zero_centered_scale,
        param_dtype=param_dtype,
    )


def rmsnorm_apply(
    params: NormParams,
    x: jax.Array,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    zero_centered_scale: bool = False,
    modulation: output.Modulation | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Divides each example by its root mean square over the axes `axis`.

    `y = x / sqrt(mean(x**2) + epsilon) * scale`, the mean taken per example
    over the normalized axes. No mean is subtracted and there is no bias.
    A zero-centered scale `g` applies as `1 + g` (Gemma's
    `x / rms(x) * (1 + g)`); with `modulation=(s, t)`, `y * (1 + s) + t`
    follows, per example.

    Args:
      params: `NormParams` from `rmsnorm_init(feature_shape)`; `scale` of the
        normalized axes' shape or `None`. A bias, if present, is added.
      x: floating input of any rank. The mean square of bfloat16/float16
        inputs is accumulated in float32; the output has `x`'s dtype.
      axis: the normalized axes, an int or a tuple of ints. Default -1.
      epsilon: added to the mean square, > 0. Default 1e-6.
      mask: optional boolean array of entries that contribute to the mean
        square, by the one mask rule (see `layernorm_apply`).
      zero_centered_scale: `params.scale` holds `g` and is applied as
        `1 + g`, in the statistics dtype. Default False.
      modulation: optional per-example `(scale, shift)`, as in
        `layernorm_apply`. Default None.
      dtype: the output dtype, floating. Default None: `x`'s dtype.

    Returns:
      `y`, of `x`'s shape and of dtype `dtype`, computed in the statistics
      dtype and rounded once.

    Raises:
      TypeError: `x`, `mask`, `modulation` or `dtype` has the wrong dtype.
      ValueError: `axis` is out of range or repeated; `scale` does not have
        the normalized axes' shape; `mask` or `modulation` is not
        broadcastable; `epsilon <= 0`.

    Examples:
      >>> params = bnjax.rmsnorm_init(2)
      >>> bnjax.rmsnorm_apply(params, jnp.array([[3.0, -3.0]])).round(3)
      Array([[ 1., -1.]], dtype=float32)

    References:
      Zhang & Sennrich 2019, Root Mean Square Layer Normalization,
      arXiv:1910.07467.
    """
    axes = layernorm.check_inputs(params, x, axis, epsilon)
    modulation = checks.check_modulation(modulation, x.shape, axes[-1])
    out_dtype = checks.check_output_dtype(dtype, x.dtype)
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, None)
    mean_square = stats.mean_square(x, axes, mask=mask)
    dtype = mean_square.dtype
    # Scaling by the per-example factor before the per-feature scale (rather
    # than by their full-size product) saves autodiff two passes over `x`.
    y = x.astype(dtype) * lax.rsqrt(mean_square + epsilon)
    scale = output.learned_scale(params.scale, zero_centered_scale, dtype)
    if scale is not None:
        y = y * stats.broadcast_to_axes(scale, x.ndim, axes)
    if params.bias is not None:
        y = y + stats.broadcast_to_axes(params.bias, x.ndim, axes).astype(dtype)
    return output.finish(y, modulation, out_dtype)
