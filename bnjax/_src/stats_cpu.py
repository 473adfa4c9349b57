"""XLA:CPU's form of the shifted sums of `stats._column_moments`.

Selected by `jax.lax.platform_dependent` for the CPU backend only; every
other backend runs `stats.shifted_sums`, the same sums written plainly.

XLA:CPU neither fuses two reductions of one input into one loop nor lets
each reduction recompute `x - shift` on its own: it merges the two equal
subtractions into one, writes `d = x - shift` out in full and reads it back
twice. Here an optimization barrier (which moves no data) hands each sum
its own copy of the operands, so each is one loop that reads `x`; and the
JVP rule restates the derivatives with fresh operands, so reverse mode
folds them into the final `dx` pass instead of adding passes over `x`.

Measured on an AMD EPYC (2 cores, jax/jaxlib 0.10.2, one XLA thread per
core), BatchNorm on NHWC (32, 56, 56, 64) float32, as a multiple of a
per-channel `x * a + b`, interleaved medians: forward 3.12 plainly vs 2.37
here, forward+backward 2.08 vs 1.70 (`benchmarks/RESULTS.md` has the full
table). On GPU a barrier would only prevent the fusion XLA does there.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def shifted_sums(
    x: jax.Array, shift: jax.Array, *, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """`sum(d)` and `sum(d**2)` over `axes` of `d = x - shift`: each sum its own loop over `x`."""
    return _separate_sums(x, shift, mask, axes)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _separate_sums(
    x: jax.Array, shift: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    x_1, x_2, shift_1, shift_2 = lax.optimization_barrier((x, x, shift, shift))
    d_1 = _masked(x_1.astype(shift.dtype) - shift_1, mask)
    d_2 = _masked(jnp.square(x_2.astype(shift.dtype) - shift_2), mask)
    return jnp.sum(d_1, axes, keepdims=True), jnp.sum(d_2, axes, keepdims=True)


@_separate_sums.defjvp
def _separate_sums_jvp(
    axes: tuple[int, ...],
    primals: tuple[jax.Array, jax.Array, jax.Array | None],
    tangents: tuple[jax.Array, jax.Array, object],
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    x, shift, mask = primals
    x_dot, shift_dot, _ = tangents
    sums = _separate_sums(x, shift, mask, axes)
    fresh_x, fresh_shift = lax.optimization_barrier((x, shift))
    d = fresh_x.astype(shift.dtype) - fresh_shift
    d_dot = _masked(x_dot.astype(shift.dtype) - shift_dot, mask)
    return sums, (jnp.sum(d_dot, axes, keepdims=True), 2 * jnp.sum(d * d_dot, axes, keepdims=True))


def _masked(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, 0)
