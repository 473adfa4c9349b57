"""The containers every normalizer passes around.

Both are NamedTuples, hence pytrees: they go through `jax.jit`, `jax.grad`,
`jax.tree.map`, optax and checkpointing without registration.
"""

from typing import NamedTuple

import jax


class NormParams(NamedTuple):
    """Learnable affine parameters of a normalizer.

    Attributes:
      scale: multiplies the normalized input (gamma). Shape `(C,)` for the
        normalizers with a feature axis, or the shape of the normalized axes
        for LayerNorm. `None` when created with `use_scale=False`.
      bias: added after scaling (beta). Same shape as `scale`. `None` when
        created with `use_bias=False`.
    """

    scale: jax.Array | None
    bias: jax.Array | None


class BatchStats(NamedTuple):
    """Running statistics of BatchNorm, used in eval mode.

    Attributes:
      mean: running mean per feature, shape `(C,)`.
      var: running biased variance per feature, shape `(C,)`.
      count: int32 scalar, the number of training updates folded in so far.
        It drives the cumulative average of `momentum=None`.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array
