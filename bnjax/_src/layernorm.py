"""Layer Normalization as a pure function of params and input."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from bnjax._src import checks, output, stats
from bnjax._src.types import NormParams


def layernorm_init(
    feature_shape: int | Sequence[int],
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
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
      zero_centered_scale: store the scale as `g`, initialized to 0, which
        `layernorm_apply(..., zero_centered_scale=True)` applies as `1 + g`
        (Transformer Engine's `zero_centered_gamma`). Default False.
      param_dtype: dtype of the parameters. Default float32.

    Returns:
      `NormParams(scale, bias)`, each of shape `feature_shape` or `None`.

    Examples:
      >>> bnjax.layernorm_init((2, 3)).scale.shape
      (2, 3)
    """
    shape = tuple(feature_shape) if isinstance(feature_shape, Sequence) else (feature_shape,)
    for i, n in enumerate(shape):
        checks.check_size(f"feature_shape[{i}]", n)
    return NormParams(
        scale=output.initial_scale(shape, zero_centered_scale, param_dtype) if use_scale else None,
        bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    )


def layernorm_apply(
    params: NormParams,
    x: jax.Array,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    zero_centered_scale: bool = False,
    modulation: output.Modulation | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Normalizes each example of `x` over the axes `axis`.

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, where `mean` and
    the biased `var` are taken per example over the normalized axes, and
    `scale` and `bias` hold one value per position of those axes (`scale`
    is `1 + g` for a zero-centered scale `g`). With `modulation=(s, t)`,
    `y * (1 + s) + t` follows, per example. There is no running state:
    training and evaluation compute the same thing.

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
      zero_centered_scale: `params.scale` holds `g` and is applied as
        `1 + g`, in the statistics dtype (from
        `layernorm_init(..., zero_centered_scale=True)`). Default False.
      modulation: optional `(scale, shift)` computed per example, e.g. from
        a timestep or class embedding (DiT's adaLN; FiLM's `gamma` is
        `1 + scale`): arrays of `x`'s rank, each axis 1 or `x`'s size
        (`(N, 1, C)` for tokens `(N, T, C)`), applied after the learned
        affine as `y * (1 + scale) + shift`. Either may be None. Gradients
        reach both.
      dtype: the output dtype, floating. Default None: `x`'s dtype.

    Returns:
      `y`, of `x`'s shape and of dtype `dtype`. Everything up to the output
      is computed in the statistics dtype (float32 for bfloat16/float16
      inputs) and rounded once.

    Raises:
      TypeError: `x`, `mask`, `modulation` or `dtype` has the wrong dtype.
      ValueError: `axis` is out of range or repeated; params do not have the
        shape of the normalized axes; `mask` or `modulation` is not
        broadcastable; `epsilon <= 0`.

    Examples:
      >>> params = bnjax.layernorm_init(4)
      >>> x = jnp.array([[1.0, 3.0, 1.0, 3.0], [0.0, 0.0, 4.0, 4.0]])
      >>> bnjax.layernorm_apply(params, x).round(4)
      Array([[-1.,  1., -1.,  1.],
             [-1., -1.,  1.,  1.]], dtype=float32)

    References:
      Ba, Kiros & Hinton 2016, Layer Normalization, arXiv:1607.06450.
    """
    axes = check_inputs(params, x, axis, epsilon)
    modulation = checks.check_modulation(modulation, x.shape, axes[-1])
    out_dtype = checks.check_output_dtype(dtype, x.dtype)
    if mask is not None:
        mask = checks.broadcast_mask(mask, x.shape, None)
    batch = stats.moments(x, axes, mask=mask)
    scale = output.learned_scale(params.scale, zero_centered_scale, batch.mean.dtype)
    scale = stats.broadcast_to_axes(scale, x.ndim, axes)
    bias = stats.broadcast_to_axes(params.bias, x.ndim, axes)
    y = stats.normalize(x, batch.mean, batch.var, scale, bias, epsilon)
    return output.finish(y, modulation, out_dtype)


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
