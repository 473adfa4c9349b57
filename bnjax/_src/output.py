"""What every normalizer does around its statistics: scale convention, modulation, output dtype.

* `initial_scale`, `learned_scale`: the scale the affine applies, `g` or, for a scale stored
  zero-centered, `1 + g`.
* `finish`: the per-example modulation `y * (1 + scale) + shift` (DiT's
  adaLN, FiLM), then the single cast to the output dtype.

Both run in the statistics dtype (at least float32), so a bfloat16 input is
rounded once, at the end, not once before the modulation and again after.
"""

from typing import overload

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

Modulation = tuple[jax.Array | None, jax.Array | None]


def initial_scale(shape: tuple[int, ...], zero_centered: bool, dtype: DTypeLike) -> jax.Array:
    """A scale that applies as 1: stored as 1, or as 0 when applied as `1 + g`."""
    return jnp.zeros(shape, dtype) if zero_centered else jnp.ones(shape, dtype)


@overload
def learned_scale(scale: jax.Array, zero_centered: bool, dtype: jnp.dtype) -> jax.Array: ...
@overload
def learned_scale(scale: None, zero_centered: bool, dtype: jnp.dtype) -> None: ...
def learned_scale(
    scale: jax.Array | None, zero_centered: bool, dtype: jnp.dtype
) -> jax.Array | None:
    """The learned scale in `dtype`: `scale`, or `1 + scale` when stored zero-centered."""
    if scale is None:
        return None
    scale = scale.astype(dtype)
    return 1 + scale if zero_centered else scale


def finish(y: jax.Array, modulation: Modulation | None, dtype: jnp.dtype) -> jax.Array:
    """`y * (1 + scale) + shift` in `y`'s dtype, then cast to `dtype`.

    `modulation` has been checked by `checks.check_modulation` against `y`'s
    shape; either part may be None.
    """
    if modulation is not None:
        scale, shift = modulation
        if scale is not None:
            y = y * (1 + scale.astype(y.dtype))
        if shift is not None:
            y = y + shift.astype(y.dtype)
    return y.astype(dtype)
