"""Weight Normalization as a pure function of a direction kernel and a scale."""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from bnjax._src import checks, stats
from bnjax._src.types import NormParams


def weightnorm_init(
    kernel: jax.Array, *, axis: int = -1, param_dtype: DTypeLike = jnp.float32
) -> NormParams:
    """Creates Weight Normalization's scale from a kernel: the kernel's norm per output.

    With this scale, `weightnorm_apply(params, kernel)` gives back `kernel`
    (up to rounding): training starts from the kernel's initialization, and
    the direction `v` is the kernel itself, kept by the model as its own
    parameter.

    Args:
      kernel: floating kernel of rank >= 1 with its outputs on `axis`, e.g.
        `(in, out)` for Dense or `(H, W, in, out)` (HWIO) for Conv.
      axis: the output axis. Default -1.
      param_dtype: dtype of the scale. Default float32.

    Returns:
      `NormParams(scale, None)`: `scale` of shape `(kernel.shape[axis],)`,
      the Euclidean norm over every axis but `axis`.

    Raises:
      TypeError: `kernel` is not floating; `axis` is not an int.
      ValueError: `axis` is out of range; `kernel` is a scalar.

    Examples:
      >>> kernel = jnp.array([[3.0, 0.0], [4.0, 2.0]])  # (in=2, out=2)
      >>> bnjax.weightnorm_init(kernel).scale
      Array([5., 2.], dtype=float32)
    """
    out_axis = checks.check_kernel(kernel, axis, name="kernel")
    norm = jnp.sqrt(_sum_of_squares(jnp.asarray(kernel), out_axis))
    return NormParams(scale=norm.reshape(-1).astype(param_dtype), bias=None)


def weightnorm_apply(
    params: NormParams, v: jax.Array, *, axis: int = -1, epsilon: float = 1e-12
) -> jax.Array:
    """The kernel `w = scale * v / ||v||`, the norm per output over every axis but `axis`.

    Weight Normalization splits a kernel into a direction `v` (any scale)
    and a length `scale` per output, both learned: the gradient reaches `v`
    through the direction only. `||v||` is `max(sqrt(sum(v**2)), epsilon)`
    (as `torch.nn.functional.normalize`), computed in float32 at least for
    bfloat16/float16 kernels; its gradient is finite for `v = 0`. This is
    `torch.nn.utils.parametrizations.weight_norm(module, dim=0)` on PyTorch's
    `(out, in, ...)` layout.

    Args:
      params: `NormParams(scale, None)` from `weightnorm_init`, `scale` of
        shape `(v.shape[axis],)`.
      v: floating kernel (the direction) of rank >= 1, outputs on `axis`.
      axis: the output axis. Default -1 (`(in, out)`, `HWIO`).
      epsilon: lower bound of the norm, > 0. Default 1e-12.

    Returns:
      `w`, of `v`'s shape and dtype.

    Raises:
      TypeError: `v` is not floating; `axis` is not an int.
      ValueError: `axis` is out of range; `params.scale` does not have shape
        `(v.shape[axis],)`; `epsilon <= 0`.

    Examples:
      >>> v = jnp.array([[3.0, 0.0], [4.0, 1.0]])
      >>> bnjax.weightnorm_apply(bnjax.NormParams(jnp.array([1.0, 3.0]), None), v)
      Array([[0.6, 0. ],
             [0.8, 3. ]], dtype=float32)

    References:
      Salimans & Kingma 2016, Weight Normalization, arXiv:1602.07868.
    """
    out_axis = checks.check_kernel(v, axis, name="v")
    checks.check_epsilon(epsilon)
    if params.scale is None:
        raise ValueError("`params.scale` must be an array, got None. Use `weightnorm_init(v)`.")
    what = f"the output axis {out_axis} of `v` with shape {v.shape}"
    checks.check_param_shape("params.scale", params.scale, (v.shape[out_axis],), what)
    dtype = stats.stats_dtype(v.dtype)
    norm = jnp.sqrt(jnp.maximum(_sum_of_squares(v, out_axis), epsilon * epsilon))
    scale = stats.broadcast_to_axes(params.scale, v.ndim, (out_axis,)).astype(dtype)
    return (v.astype(dtype) * (scale / norm)).astype(v.dtype)


def _sum_of_squares(v: jax.Array, out_axis: int) -> jax.Array:
    """`sum(v**2)` over every axis but `out_axis` (kept with size 1), in the statistics dtype."""
    reduced = tuple(a for a in range(v.ndim) if a != out_axis)
    return jnp.sum(jnp.square(v.astype(stats.stats_dtype(v.dtype))), reduced, keepdims=True)
