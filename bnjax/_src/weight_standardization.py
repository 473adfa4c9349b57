"""Weight Standardization: each output's kernel slice to zero mean and unit variance."""

import jax
import jax.numpy as jnp

from bnjax._src import checks, stats


def weight_standardize(w: jax.Array, *, axis: int = -1, epsilon: float = 1e-5) -> jax.Array:
    """Standardizes a kernel per output: `(w - mean) / sqrt(var + epsilon)`.

    `mean` and the biased `var` are taken per output over every axis but
    `axis` (for a `HWIO` kernel, over `(H, W, I)`), by the same stable
    moments every bnjax normalizer uses (the per-row form of LayerNorm),
    accumulated in float32 at least.
    There are no parameters and no state: the model keeps `w` as its
    parameter and convolves with the standardized kernel, so gradients flow
    through the standardization. Paired with GroupNorm it is the recipe of
    Qiao et al. for training with micro-batches; timm's `StdConv2d` uses the
    same form.

    Args:
      w: floating kernel of rank >= 2, outputs on `axis`, e.g. `(in, out)`
        or `(H, W, in, out)`.
      axis: the output axis. Default -1 (`OIHW` kernels from PyTorch: 0).
      epsilon: added to the variance, > 0. Default 1e-5.

    Returns:
      The standardized kernel, of `w`'s shape and dtype.

    Raises:
      TypeError: `w` is not floating; `axis` is not an int.
      ValueError: `w` has rank < 2; `axis` is out of range; `epsilon <= 0`.

    Examples:
      >>> w = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # (in=2, out=2)
      >>> bnjax.weight_standardize(w, epsilon=1e-6).round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)

    References:
      Qiao, Wang, Liu, Shen & Yuille 2019, Micro-Batch Training with
      Batch-Channel Normalization and Weight Standardization,
      arXiv:1903.10520.
    """
    out_axis = checks.check_kernel(w, axis, name="w", min_rank=2)
    checks.check_epsilon(epsilon)
    # Outputs first, so each output's entries form one row: a kernel is
    # small, and the row moments (two passes over each row) are the plain
    # textbook form, lighter to compile than the one-pass column sums.
    rows = jnp.moveaxis(w, out_axis, 0)
    reduced = tuple(range(1, w.ndim))
    moments = stats.moments(rows, reduced)
    standardized = stats.normalize(rows, moments.mean, moments.var, None, None, epsilon)
    return jnp.moveaxis(standardized, 0, out_axis).astype(w.dtype)
