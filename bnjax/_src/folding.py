"""Folding eval-mode BatchNorm into the neighbouring Dense or Conv layer.

In eval mode BatchNorm is a fixed per-feature affine map,
`bn(z) = z * s + (bias - mean * s)` with `s = scale / sqrt(var + epsilon)`,
so it can be merged into an adjacent linear layer for inference: one layer
instead of two, the same outputs up to float rounding.
"""

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src import checks, output
from bnjax._src.types import BatchStats, NormParams


def fold_batchnorm_after(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: NormParams,
    state: BatchStats,
    *,
    epsilon: float = 1e-5,
    zero_centered_scale: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Folds an eval-mode BatchNorm into the Dense or Conv layer before it.

    For `z = layer(x; kernel) + bias` followed by BatchNorm on `z`'s features
    with running statistics `state`, returns `(kernel', bias')` with
    `layer(x; kernel') + bias' == batchnorm_apply(params, state, z, False)`:
    `kernel' = kernel * s` along its output-channel axis and
    `bias' = (bias - mean) * s + params.bias`, where
    `s = params.scale / sqrt(var + epsilon)`. This holds for any layer linear
    in its kernel whose last kernel axis is the output channel: Dense
    (`(in, out)`), and Conv with `HWIO` kernels of any spatial rank (`WIO`,
    `HWIO`, `DHWIO`), any stride, padding, dilation or feature grouping.

    Args:
      kernel: the layer's weights, output channels last: `(in, C)` or
        `(*spatial, in // groups, C)`. Floating.
      bias: the layer's bias `(C,)`, or None for a layer without bias.
      params: the BatchNorm's `NormParams`, fields `(C,)` or None.
      state: the BatchNorm's `BatchStats`, `mean` and `var` of shape `(C,)`.
      epsilon: the BatchNorm's epsilon, > 0. Default 1e-5.
      zero_centered_scale: the BatchNorm's `params.scale` holds `g`, applied
        as `1 + g` (as in `batchnorm_apply`). Default False.

    Returns:
      `(kernel', bias')`: `kernel'` of `kernel`'s shape and dtype, `bias'` of
      shape `(C,)` and `bias`'s dtype (`kernel`'s when `bias` is None). The
      arithmetic runs in at least float32.

    Raises:
      TypeError: `kernel` is not floating.
      ValueError: `kernel.shape[-1]`, `bias`, params and state disagree on `C`;
        `epsilon <= 0`.

    Examples:
      >>> params, state = bnjax.batchnorm_init(3)
      >>> state = state._replace(mean=jnp.array([1.0, 0.0, -1.0]), var=jnp.full(3, 4.0))
      >>> kernel, bias = bnjax.fold_batchnorm_after(jnp.ones((5, 3)), None, params, state)
      >>> kernel.shape, bias.shape
      ((5, 3), (3,))
      >>> bias.round(3)
      Array([-0.5,  0. ,  0.5], dtype=float32)
    """
    checks.check_floating(kernel, "kernel")
    checks.check_epsilon(epsilon)
    num_features = jnp.shape(kernel)[-1] if jnp.ndim(kernel) else 0
    _check_batchnorm(params, state, bias, num_features, "`kernel.shape[-1]`")
    dtype = _compute_dtype(kernel, bias, params, state)
    factor, shift = _affine(params, state, epsilon, zero_centered_scale, dtype)
    new_kernel = kernel.astype(dtype) * factor.reshape((1,) * (kernel.ndim - 1) + (-1,))
    old_bias = jnp.zeros((), dtype) if bias is None else bias.astype(dtype)
    new_bias = old_bias * factor + shift
    bias_dtype = kernel.dtype if bias is None else bias.dtype
    return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def fold_batchnorm_before_dense(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: NormParams,
    state: BatchStats,
    *,
    epsilon: float = 1e-5,
    zero_centered_scale: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Folds an eval-mode BatchNorm on a Dense layer's input into the layer.

    For `y = batchnorm_apply(params, state, x, False) @ kernel + bias`, with
    BatchNorm over `x`'s `in` features, returns `(kernel', bias')` with
    `y == x @ kernel' + bias'`: `kernel' = s[:, None] * kernel` and
    `bias' = (params.bias - mean * s) @ kernel + bias`, where
    `s = params.scale / sqrt(var + epsilon)`.

    There is no Conv counterpart: with zero padding, a Conv sees zeros at
    the borders, not BatchNorm's output for them (`params.bias - mean * s`),
    so the folded bias would be wrong near the borders. Fold a BatchNorm
    before a Conv only when the Conv uses no padding ("VALID").

    Args:
      kernel: the Dense layer's weights, shape `(C, out)`. Floating.
      bias: the Dense layer's bias `(out,)`, or None for a layer without bias.
      params: the BatchNorm's `NormParams`, fields `(C,)` or None.
      state: the BatchNorm's `BatchStats`, `mean` and `var` of shape `(C,)`.
      epsilon: the BatchNorm's epsilon, > 0. Default 1e-5.
      zero_centered_scale: the BatchNorm's `params.scale` holds `g`, applied
        as `1 + g`. Default False.

    Returns:
      `(kernel', bias')`: `kernel'` of `kernel`'s shape and dtype, `bias'` of
      shape `(out,)` and `bias`'s dtype (`kernel`'s when `bias` is None). The
      arithmetic runs in at least float32, the product at full precision.

    Raises:
      TypeError: `kernel` is not floating.
      ValueError: `kernel` is not 2-D; `kernel.shape[0]`, params and state
        disagree on `C`; `bias` is not `(out,)`; `epsilon <= 0`.

    Examples:
      >>> params, state = bnjax.batchnorm_init(4)
      >>> kernel, bias = bnjax.fold_batchnorm_before_dense(
      ...     jnp.ones((4, 2)), jnp.zeros(2), params, state._replace(mean=jnp.ones(4)))
      >>> kernel.shape, bias.round(3)
      ((4, 2), Array([-4., -4.], dtype=float32))
    """
    checks.check_floating(kernel, "kernel")
    checks.check_epsilon(epsilon)
    if jnp.ndim(kernel) != 2:
        raise ValueError(f"`kernel` must be 2-D (in, out), got shape {jnp.shape(kernel)}.")
    num_in, num_out = jnp.shape(kernel)
    _check_batchnorm(params, state, None, num_in, "`kernel.shape[0]`")
    checks.check_param_shape("bias", bias, (num_out,), "`kernel.shape[1]`")
    dtype = _compute_dtype(kernel, bias, params, state)
    factor, shift = _affine(params, state, epsilon, zero_centered_scale, dtype)
    kernel_c = kernel.astype(dtype)
    new_kernel = factor[:, None] * kernel_c
    new_bias = jnp.dot(shift, kernel_c, precision=lax.Precision.HIGHEST)
    if bias is not None:
        new_bias = new_bias + bias.astype(dtype)
    bias_dtype = kernel.dtype if bias is None else bias.dtype
    return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def _affine(
    params: NormParams,
    state: BatchStats,
    epsilon: float,
    zero_centered_scale: bool,
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """Eval-mode BatchNorm as `z * factor + shift`, per feature."""
    mean = state.mean.astype(dtype)
    factor = lax.rsqrt(state.var.astype(dtype) + epsilon)
    scale = output.learned_scale(params.scale, zero_centered_scale, dtype)
    if scale is not None:
        factor = factor * scale
    shift = -mean * factor
    if params.bias is not None:
        shift = shift + params.bias.astype(dtype)
    return factor, shift


def _compute_dtype(*trees: jax.Array | NormParams | BatchStats | None) -> jnp.dtype:
    """At least float32, or the widest floating dtype among the arrays."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(trees)]
    return jnp.promote_types(jnp.result_type(*dtypes, jnp.float32), jnp.float32)


def _check_batchnorm(
    params: NormParams,
    state: BatchStats,
    bias: jax.Array | None,
    num_features: int,
    what: str,
) -> None:
    what = f"{what} = {num_features}"
    expected = (num_features,)
    checks.check_param_shape("bias", bias, expected, what)
    checks.check_param_shape("params.scale", params.scale, expected, what)
    checks.check_param_shape("params.bias", params.bias, expected, what)
    checks.check_param_shape("state.mean", state.mean, expected, what)
    checks.check_param_shape("state.var", state.var, expected, what)
