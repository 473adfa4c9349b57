"""Moments and their application: the one place bnjax computes statistics.

Every normalizer reduces its input to a mean and a biased variance with
`moments` (or a mean square with `mean_square`), pools partial moments with
`pool`, and applies them with `normalize`. Keeping all of it here gives every
normalizer the same guarantees:

* float32 accumulation for bfloat16/float16 inputs (float64 stays float64);
  the conversion happens inside each reduction, no converted copy is made;
* a variance that is stable for inputs whose mean is far larger than their
  spread (see `moments`);
* masks, with exact integer counts of the entries that contribute;
* exact synchronization across a mapped axis, in at most two collectives
  of O(C) values each, whatever the number of devices (see `pool`).

There is one formulation for every backend; nothing here depends on the
compiler, the cache size or the size of the input.
"""

import math
from collections.abc import Hashable, Sequence
from functools import partial
from typing import NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from bnjax._src import stats_cpu

AxisName = Hashable | tuple[Hashable, ...]


class Moments(NamedTuple):
    """Statistics of an input over its reduced axes (kept with size 1).

    Attributes:
      mean: the mean, in the statistics dtype (float32, or float64 for
        float64 inputs). 0 where no entry contributed.
      var: the biased variance (divide by `count`), same shape and dtype.
        0 where no entry contributed.
      count: int32, broadcastable to `mean`: how many entries contributed.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # the field hides tuple.count: python/mypy#3950


def stats_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype statistics are accumulated in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
) -> Moments:
    """Mean and biased variance of `x` over `axes`.

    One formula, `mean = s + E[x - s]` and `var = E[(x - s)^2] - E[x - s]^2`
    with `s` a value per kept position near its data, held out of the
    gradient. Both results are exact functions of `x` for any `s`, so
    autodiff gives the gradients of the textbook formulas, to every order;
    and since `s` lies within the data's spread of the mean, the
    cancellation that ruins the unshifted form (`E[x^2] - E[x]^2` for mean
    1e4, std 1 in float32) does not occur. The choice of `s` follows the
    layout, not the size:

    * Rows (the reduced axes are the trailing ones: LayerNorm, RMSNorm,
      InstanceNorm on NCHW): `s` is the row's mean, and the variance is
      then taken about the corrected mean, `E[(x - mean)^2]`, the textbook
      two-pass form (its derivative through the mean, exactly zero, is left
      out: `_mean_square_deviation`). A row is one kept position's data, so
      compilers keep it on chip between the passes (XLA fuses them into one
      loop on CPU and one kernel on GPU), and the extra passes cost no
      memory traffic.
    * Columns (every other layout: BatchNorm on NHWC and NCHW, GroupNorm
      on NHWC): each statistic spans a large strided block, so a pass is
      a trip through memory.
      `s` is the first entry (the masked mean with a mask, one more read),
      and the two shifted sums are taken in one pass (`_shifted_sums`).

    Args:
      x: floating input of any rank.
      axes: the reduced axes, sorted and non-negative.
      mask: optional boolean array of `x`'s rank, each axis of size 1 or of
        `x`'s size; False entries do not contribute.
      axis_name: optional mapped axis (or tuple of axes) to synchronize
        over: the moments of all devices' entries, pooled exactly by `pool`.

    Returns:
      `Moments` with `mean` and `var` of shape `x.shape` with `axes` set to 1.
    """
    leading, trailing = _split_at_last_kept(x.ndim, axes)
    if leading and trailing and 0 not in axes:
        # Per-example statistics over reduced axes on both sides of a kept
        # one (GroupNorm on channels-last input) do not form one contiguous
        # reduction. Reduce the larger block first, then pool the small
        # per-position moments exactly: (H, W) per channel, then the
        # channels of a group. Statistics across the batch (BatchNorm on
        # NCHW) span the whole input, so they take the column form: one
        # pass, where reducing each (H, W) row first takes three.
        def size(block: tuple[int, ...]) -> int:
            return math.prod(x.shape[a] for a in block)

        first, then = (
            (leading, trailing) if size(leading) >= size(trailing) else (trailing, leading)
        )
        return pool(moments(x, first, mask=mask), then, axis_name)
    if _are_rows(x.ndim, axes):
        local = _row_moments(x, axes, mask)
    else:
        local = _column_moments(x, axes, mask)
    return local if axis_name is None else pool(local, (), axis_name)


def _row_moments(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None) -> Moments:
    """`moments` over the trailing axes: two passes over each row."""
    dtype = stats_dtype(x.dtype)
    count = _count(x.shape, axes, mask)
    safe_count = jnp.maximum(count, 1).astype(dtype)
    rough = lax.stop_gradient(_masked_mean(x.astype(dtype), mask, safe_count, axes))
    # For mean 1e4, std 1 in float32 the plain mean is off by ~1e-3, the
    # mean of the deviations from it corrects that to the last bit.
    mean = rough + _masked_mean(x.astype(dtype) - rough, mask, safe_count, axes)
    var = _mean_square_deviation(x.astype(dtype), mean, mask, safe_count, axes)
    return Moments(mean, var, count)


def _masked_mean(
    v: jax.Array, mask: jax.Array | None, safe_count: jax.Array, axes: tuple[int, ...]
) -> jax.Array:
    """The mean of `v` over `axes` (kept with size 1), masked entries left out."""
    v = v if mask is None else jnp.where(mask, v, 0)
    return jnp.sum(v, axes, keepdims=True) / safe_count


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _mean_square_deviation(
    x: jax.Array,
    mean: jax.Array,
    mask: jax.Array | None,
    safe_count: jax.Array,
    axes: tuple[int, ...],
) -> jax.Array:
    """`E[(x - mean)^2]` over `axes`, for `mean` the (masked) mean of `x` over `axes`.

    Through `mean` its derivative is `-2 E[x - mean] dmean`, exactly zero for
    that mean; autodiff would still take `E[x - mean]`, one more reduction
    per row in reverse mode. The JVP rule leaves the term out, and is itself
    differentiable, so every higher derivative is the textbook formula's.
    """
    return _masked_mean(jnp.square(x - mean), mask, safe_count, axes)


@_mean_square_deviation.defjvp
def _mean_square_deviation_jvp(
    axes: tuple[int, ...],
    primals: tuple[jax.Array, jax.Array, jax.Array | None, jax.Array],
    tangents: tuple[jax.Array, object, object, object],
) -> tuple[jax.Array, jax.Array]:
    x, mean, mask, safe_count = primals
    var = _mean_square_deviation(x, mean, mask, safe_count, axes)
    return var, 2 * _masked_mean((x - mean) * tangents[0], mask, safe_count, axes)


def _column_moments(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None) -> Moments:
    """`moments` over axes that are not all trailing: one pass."""
    dtype = stats_dtype(x.dtype)
    count = _count(x.shape, axes, mask)
    safe_count = jnp.maximum(count, 1).astype(dtype)
    if mask is None:
        shift = _first_entry(x, axes)
    else:
        shift = jnp.sum(jnp.where(mask, x, 0), axes, keepdims=True, dtype=dtype) / safe_count
    shift = lax.stop_gradient(shift).astype(dtype)
    sum_d, sum_d2 = _sums_on_merged_view(x, shift, mask, axes)
    mean_d = sum_d / safe_count
    var = jnp.maximum(sum_d2 / safe_count - mean_d * mean_d, 0)
    mean = shift + mean_d
    if mask is not None:
        mean = jnp.where(count > 0, mean, 0)
    return Moments(mean, var, count)


def shifted_sums(
    x: jax.Array, shift: jax.Array, *, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """`sum(d)` and `sum(d**2)` over `axes` of `d = x - shift`, masked entries left out.

    Written plainly: compilers that fuse sibling reductions (XLA on GPU and
    TPU) read `x` once for both. XLA:CPU does not; see `stats_cpu`.
    """
    d = x.astype(shift.dtype) - shift
    if mask is not None:
        d = jnp.where(mask, d, 0)
    return jnp.sum(d, axes, keepdims=True), jnp.sum(d * d, axes, keepdims=True)


def _first_entry(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """`x` at index 0 along `axes` (kept with size 1), whole along the others.

    JAX refuses to slice an axis split over an explicit mesh axis (sharded
    `jit` on a mesh of `jax.make_mesh`, whose axes are explicit by default)
    down to size 1; such an axis is indexed with a gather whose small result
    is replicated instead.
    """
    sharding = jax.typeof(x).sharding
    spec = tuple(getattr(sharding, "spec", None) or ())
    spec += (None,) * (x.ndim - len(spec))
    sharded = [a for a in axes if spec[a] is not None]
    entry = x[
        tuple(slice(0, 1) if a in axes and a not in sharded else slice(None) for a in range(x.ndim))
    ]
    for a in sharded:
        spec = (*spec[:a], None, *spec[a + 1 :])
        index = (*(slice(None),) * a, jnp.zeros((1,), jnp.int32))
        # A NamedSharding, not a bare spec: the caller need not be under `jax.set_mesh`.
        entry = entry.at[index].get(out_sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)))
    return entry


def mean_square(x: jax.Array, axes: tuple[int, ...], *, mask: jax.Array | None = None) -> jax.Array:
    """`mean(x**2)` over `axes` (kept with size 1), in the statistics dtype.

    Args:
      x: floating input.
      axes: the reduced axes, sorted and non-negative.
      mask: optional boolean array as in `moments`.

    Returns:
      The mean square; 0 where no entry contributes.
    """
    dtype = stats_dtype(x.dtype)
    safe_count = jnp.maximum(_count(x.shape, axes, mask), 1).astype(dtype)
    return _masked_mean(jnp.square(x.astype(dtype)), mask, safe_count, axes)


def pool(
    parts: Moments,
    axes: tuple[int, ...],
    axis_name: AxisName | None = None,
    *,
    between_parts: bool = True,
) -> Moments:
    """The moments of the union of the parts of `parts` along `axes`.

    Exact, weighted by count (parts with count 0 do not contribute): the
    mean is `sum(n_i m_i) / n` and the variance pools the deviations of the
    parts' means from it, `sum(n_i (v_i + (m_i - mean)^2)) / n`, which stays
    stable for large means (raw second moments would not).

    With `axis_name`, the pooled moments of every device along that mapped
    axis are pooled in turn, in two `psum`s: the counts, `n_d m_d` and
    `n_d v_d` first, then, once a first pooled mean `mu` is known
    everywhere, `n_d (m_d - mu)` and `n_d (m_d - mu)^2`, which correct the
    mean to the last bit and give the spread of the device means. Each
    carries O(C) values (C the number of kept positions), whatever the
    number of devices; the second is skipped with `between_parts=False`.

    Args:
      parts: moments of the parts, each field broadcastable to `parts.mean`.
      axes: the axes of `parts.mean` that index the parts (may be empty).
      axis_name: optional mapped axis (or tuple of axes) to pool across.
      between_parts: False drops the spread of the parts' means: `var` is
        then the count-weighted average of the parts' variances (ghost
        BatchNorm's running update).

    Returns:
      `Moments` with `axes` kept with size 1.
    """
    if axes:
        parts = _pool_sums(parts, axes, None, between_parts)
    if axis_name is not None:
        parts = _pool_sums(parts, (), axis_name, between_parts)
    return parts


def _pool_sums(
    parts: Moments, axes: tuple[int, ...], axis_name: AxisName | None, between_parts: bool
) -> Moments:
    """`pool` along `axes` or across `axis_name`."""
    dtype = parts.mean.dtype
    # Counts stay as narrow as they are along the other axes (BatchNorm's
    # are the same for every feature).
    shape = [
        n if a in axes else m
        for a, (n, m) in enumerate(zip(parts.mean.shape, parts.count.shape, strict=True))
    ]
    count = jnp.broadcast_to(parts.count, shape)
    weight = count.astype(dtype)
    sums: tuple[jax.Array, ...] = (
        jnp.sum(count, axes, keepdims=True),
        jnp.sum(weight * parts.mean, axes, keepdims=True),
        jnp.sum(weight * parts.var, axes, keepdims=True),
    )
    if axis_name is not None:
        sums = _psum_with_count(*sums, axis_name=axis_name)
    total, weighted_means, weighted_vars = sums
    safe_total = jnp.maximum(total, 1).astype(dtype)
    rough = weighted_means / safe_total
    if not between_parts:
        return Moments(rough, weighted_vars / safe_total, total)
    # Dividing the sum by `n` may leave the mean an ulp off, even when every
    # part has the same mean (a constant channel), and a zero variance
    # magnifies that. The parts' deviations from it correct the mean to the
    # last bit and give the spread of the means about the corrected one:
    # with `c = sum(n_i (m_i - rough))`, `mean = rough + c / n` and
    # `sum(n_i (m_i - mean)^2) = sum(n_i (m_i - rough)^2) - c^2 / n`.
    rough = lax.stop_gradient(rough)
    deviations = parts.mean - rough
    second = (
        jnp.sum(weight * deviations, axes, keepdims=True),
        jnp.sum(weight * jnp.square(deviations), axes, keepdims=True),
    )
    if axis_name is not None:
        second = lax.psum(jnp.stack(second), axis_name)
    correction, spread = second
    mean = rough + correction / safe_total
    spread = jnp.maximum(spread - correction * correction / safe_total, 0)
    return Moments(mean, (weighted_vars + spread) / safe_total, total)


# The count crosses devices as two float parts, `count // _SPLIT` and
# `count % _SPLIT`, each summed exactly in float32: the first stays below
# 2^31 / _SPLIT = 2^21 for any int32 total, the second below 2^24 for up to
# 2^24 / _SPLIT = 16384 devices.
_SPLIT = 2**10


def _psum_with_count(
    count: jax.Array, *values: jax.Array, axis_name: AxisName
) -> tuple[jax.Array, ...]:
    """`psum` of an int32 `count` and float `values` as one all-reduce, the count exact.

    `lax.psum` of several arrays makes one collective per array, so all of
    them travel flattened into one float array.
    """
    dtype = values[0].dtype
    parts = (count // _SPLIT, count % _SPLIT, *values)
    flat = jnp.concatenate([p.astype(dtype).reshape(-1) for p in parts])
    flat = lax.psum(flat, axis_name)
    sizes = np.cumsum([p.size for p in parts])[:-1]
    high, low, *totals = (
        piece.reshape(p.shape) for piece, p in zip(jnp.split(flat, sizes), parts, strict=True)
    )
    return (high.astype(jnp.int32) * _SPLIT + low.astype(jnp.int32), *totals)


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
) -> jax.Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias`, in the statistics dtype.

    All statistics and parameters must already broadcast against `x` at its
    rank. The arithmetic runs in the statistics dtype and fuses into one
    elementwise pass, with the caller's modulation and cast to the output
    dtype (`output.finish`). Subtracting the mean before scaling keeps the
    result exact for inputs with a large mean.
    """
    dtype = stats_dtype(x.dtype)
    factor = lax.rsqrt(var.astype(dtype) + epsilon)
    reduced = tuple(a for a in range(x.ndim) if mean.shape[a] == 1 < x.shape[a])
    if _are_rows(x.ndim, reduced):
        # The textbook form, which compilers fuse with the row statistics.
        # Scaling by the per-row factor and then by the per-feature scale
        # (not by their full-size product) keeps autodiff's sums for each
        # to one reduction of its own kind.
        y = (x.astype(dtype) - mean.astype(dtype)) * factor
        y = y if scale is None else y * scale.astype(dtype)
        return y if bias is None else y + bias.astype(dtype)
    if scale is not None:
        factor = factor * scale.astype(dtype)
    # `(x - mean) * factor + bias`, written so that the gradient reaches
    # `mean` through a per-feature term: its cotangent is then `-factor`
    # times the bias's (a sum autodiff takes anyway), not one more pass
    # over a full-size `g * factor`. The values are unchanged:
    # `mean - stop_gradient(mean)` is exactly 0.
    fixed_mean = lax.stop_gradient(mean.astype(dtype))
    offset = -(mean.astype(dtype) - fixed_mean) * factor
    if bias is not None:
        offset = offset + bias.astype(dtype)
    # On a view with merged axes (GroupNorm's (N, H, W, G, C // G) as
    # (N, H*W, C)), the sums autodiff takes for the coefficients are plain
    # reductions over one axis.
    shape = jnp.broadcast_shapes(fixed_mean.shape, factor.shape, offset.shape)
    runs = _runs([n == 1 for n in shape])
    fixed_mean, factor, offset = (
        _merge_runs(jnp.broadcast_to(c, shape), runs) for c in (fixed_mean, factor, offset)
    )
    y = (_merge_runs(x.astype(dtype), runs) - fixed_mean) * factor + offset
    return y.reshape(x.shape)


@overload
def broadcast_to_axes(p: jax.Array, ndim: int, axes: tuple[int, ...]) -> jax.Array: ...
@overload
def broadcast_to_axes(p: None, ndim: int, axes: tuple[int, ...]) -> None: ...
def broadcast_to_axes(p: jax.Array | None, ndim: int, axes: tuple[int, ...]) -> jax.Array | None:
    """Reshapes a parameter laid out over `axes` so it broadcasts at rank `ndim`."""
    if p is None:
        return None
    shape = [1] * ndim
    for a, n in zip(axes, np.shape(p), strict=True):
        shape[a] = n
    return jnp.reshape(p, shape)


def _count(shape: tuple[int, ...], axes: tuple[int, ...], mask: jax.Array | None) -> jax.Array:
    """How many entries contribute per kept position, int32 (kept with size 1)."""
    if mask is None:
        return jnp.full((1,) * len(shape), math.prod(shape[a] for a in axes), jnp.int32)
    # Axes the mask does not span count every entry along them.
    repeats = math.prod(shape[a] for a in axes if mask.shape[a] == 1)
    return jnp.sum(mask, axes, keepdims=True, dtype=jnp.int32) * repeats


def _are_rows(ndim: int, axes: tuple[int, ...]) -> bool:
    """Whether `axes` are the trailing axes: each kept position's entries are one row."""
    return all(a >= ndim - len(axes) for a in axes)


def _split_at_last_kept(ndim: int, axes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The reduced axes before the last kept axis, and those after it."""
    last_kept = max((a for a in range(ndim) if a not in axes), default=-1)
    return tuple(a for a in axes if a < last_kept), tuple(a for a in axes if a > last_kept)


def _sums_on_merged_view(
    x: jax.Array, shift: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """The shifted sums of `_column_moments`, taken on a view of `x` with runs of axes merged.

    E.g. NHWC BatchNorm becomes a `(N*H*W, C)` reduction: merging contiguous
    axes is a free reshape, and a reduction over one merged axis is what
    compilers handle best. Axes are merged when both are reduced or both
    kept, and the mask, if any, spans both or neither (so it never needs
    broadcasting).
    """
    kinds = [(a in axes, mask is not None and mask.shape[a] == 1) for a in range(x.ndim)]
    runs = _runs(kinds)
    merged_axes = tuple(i for i, run in enumerate(runs) if kinds[run[0]][0])
    merged_mask = None if mask is None else _merge_runs(mask, runs)
    sums = lax.platform_dependent(
        _merge_runs(x, runs),
        _merge_runs(shift, runs),
        cpu=partial(stats_cpu.shifted_sums, mask=merged_mask, axes=merged_axes),
        default=partial(shifted_sums, mask=merged_mask, axes=merged_axes),
    )
    return tuple(s.reshape(shift.shape) for s in sums)


def _runs(kinds: Sequence[object]) -> list[list[int]]:
    """Groups axes into runs of adjacent axes of the same kind."""
    runs: list[list[int]] = []
    for a, kind in enumerate(kinds):
        if runs and kinds[runs[-1][0]] == kind:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


def _merge_runs(v: jax.Array, runs: list[list[int]]) -> jax.Array:
    """Reshapes `v` to one axis per run (each run all of size 1 or all full)."""
    return v.reshape([math.prod(v.shape[a] for a in run) for run in runs])
