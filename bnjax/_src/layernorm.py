"""Layer Normalization as a pure function of params and input."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import checks, stats
from bnjax._src.types import NormParams


def layernorm_init(
    feature_shape: int | Sequence[int],
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    param_dtype: Any = jnp.float32,
) -> NormParams:
    """Creates LayerNorm parameters.

    Args:
      feature_shape: the sizes of the normalized axes, in increasing axis
        order: an int for one axis (`C` for `axis=-1`), or a tuple such as
        `(H, W, C)` for `axis=(-3, -2, -1)`.
      use_scale: learn a scale per normalized position (initialized to 1).
        Default True.
      use_bias: learn a bias per normalized position (initialized to 0).
        Default True.
      param_dtype: dtype of the parameters. Default float32.

    Returns:
      `NormParams(scale, bias)`, each of shape `feature_shape` or `None`.

    Example:
      >>> bnjax.layernorm_init((2, 3)).scale.shape
      (2, 3)
    """
    shape = tuple(feature_shape) if isinstance(feature_shape, Sequence) else (feature_shape,)
    for i, n in enumerate(shape):
        checks.check_size(f"feature_shape[{i}]", n)
    return NormParams(
        scale=jnp.ones(shape, param_dtype) if use_scale else None,
        bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    )


def layernorm_apply(
    params: NormParams,
    x: jax.Array,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Normalizes each example of `x` over the axes `axis`.

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, where `mean` and
    the biased `var` are taken per example over the normalized axes, and
    `scale` and `bias` hold one value per position of those axes. There is
    no running state: training and evaluation compute the same thing.

    Args:
      params: `NormParams` from `layernorm_init(feature_shape)`, fields of
        shape `tuple(x.shape[a] for a in sorted(axis))` or `None`.
      x: floating input of any rank. Statistics of bfloat16/float16 inputs
        are accumulated in float32; the output has `x`'s dtype.
      axis: the normalized axes, an int or a tuple of ints. Default -1 (the
        feature axis; numpy-ml's `LayerNorm1D`). `(-3, -2, -1)` is numpy-ml's
        `LayerNorm2D` on `(N, H, W, C)` inputs.
      epsilon: added to the variance, > 0. Default 1e-5.
      mask: optional boolean array of entries that contribute to the
        statistics, by the one mask rule: of `x`'s rank it broadcasts by
        numpy's rules; with fewer axes it is aligned with `x`'s leading axes,
        e.g. `(N, T)` for the padded tokens of `(N, T, C)` normalized over
        `axis=(1, 2)`. False entries do not contribute; their outputs are
        still computed.

    Returns:
      `y`, of `x`'s shape and dtype.

    Raises:
      TypeError: `x` or `mask` has the wrong dtype.
      ValueError: `axis` is out of range or repeated; params do not have the
        shape of the normalized axes; `mask` is not broadcastable;
        `epsilon <= 0`.

    Example:
      >>> params = bnjax.layernorm_init(4)
      >>> x = jnp.array([[1.0, 3.0, 1.0, 3.0], [0.0, 0.0, 4.0, 4.0]])
      >>> bnjax.layernorm_apply(params, x).round(4)
      Array([[-1.,  1., -1.,  1.],
             [-1., -1.,  1.,  1.]], dtype=float32)

    References:
      Ba, Kiros & Hinton 2016, Layer Normalization, arXiv:1607.06450.
    """
    axes = check_inputs(params, x, axis, epsilon)
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, None)
    batch = stats.moments(x, axes, mask=mask)
    scale = stats.broadcast_to_axes(params.scale, x.ndim, axes)
    bias = stats.broadcast_to_axes(params.bias, x.ndim, axes)
    return stats.normalize(x, batch.mean, batch.var, scale, bias, epsilon)


def check_inputs(
    params: NormParams, x: jax.Array, axis: int | Sequence[int], epsilon: float
) -> tuple[int, ...]:
    """Checks the arguments of LayerNorm-like normalizers; returns sorted axes."""
    checks.check_floating(x)
    axes = checks.normalize_axes(axis, x.ndim)
    checks.check_epsilon(epsilon)
    expected = tuple(x.shape[a] for a in axes)
    what = f"the normalized axes {axes} of `x` with shape {x.shape}"
    checks.check_param_shape("params.scale", params.scale, expected, what)
    checks.check_param_shape("params.bias", params.bias, expected, what)
    return axes
