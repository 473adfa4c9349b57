"""Moments and their application: the one place bnjax computes statistics.

Every normalizer reduces its input to a mean and a biased variance with
`moments`, then applies them with `normalize`. Keeping both here gives all
normalizers the same guarantees:

* float32 accumulation for bfloat16/float16 inputs (float64 stays float64),
  without materializing a converted copy of the input;
* a variance that is stable for inputs whose mean is far larger than their
  spread, in one pass over the input (see `moments`);
* masks, weighted by how many entries each position contributes;
* exact synchronization across a mapped axis, in one collective.
"""

import math
from collections.abc import Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

AxisName = Hashable | tuple[Hashable, ...]


class Moments(NamedTuple):
    """Statistics of an input over its reduced axes (kept with size 1).

    Attributes:
      mean: the mean, in the statistics dtype (float32, or float64 for
        float64 inputs).
      var: the biased variance (divide by `count`), same shape and dtype.
      count: how many entries contributed: a Python int when every entry
        does, otherwise an array broadcastable to `mean`.
    """

    mean: jax.Array
    var: jax.Array
    count: int | jax.Array


def _in_cache(shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
    """Whether each statistic's entries stay in cache between two passes.

    True for fewer than 1024 entries, and for contiguous rows (the reduced
    axes are the trailing ones, as in LayerNorm) of up to 2048 entries
    (8 KiB in float32; longer rows, e.g. NCHW's (H, W), measured faster in
    one pass). `moments` then takes two passes and `normalize` the
    plain form, which XLA fuses into one loop; otherwise (BatchNorm, whose
    statistics span the whole input) one pass, and a per-feature route for
    the mean's gradient.
    """
    entries = math.prod(shape[a] for a in axes)
    trailing = all(a > k for a in axes for k in range(len(shape)) if k not in axes)
    return entries < 1024 or (trailing and entries <= 2048)


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

    The variance is taken in one pass on shifted data: with `s` an entry of
    `x` per kept position (held out of the gradient), `d = x - s` gives
    `var = E[d^2] - E[d]^2`. Neither sum waits for the other (two-pass
    `jnp.var` needs the mean before it can start), and since `s` lies
    within the data's spread of the mean, the cancellation that ruins the
    unshifted form (`E[x^2] - E[x]^2` for mean 1e4, std 1 in float32) does
    not occur. Both results are exact functions of `x` for any
    `s`, so gradients of every order are those of the textbook formulas.

    When each statistic covers few entries (a LayerNorm row), its data stays
    in cache between passes, and a two-pass form (the mean, corrected by the
    mean of the deviations from it, then `E[(x - mean)^2]`) is exact and
    faster: XLA fuses it with what follows.

    Args:
      x: floating input of any rank.
      axes: the reduced axes, sorted and non-negative.
      mask: optional boolean array of `x`'s rank, each axis of size 1 or of
        `x`'s size; False entries do not contribute.
      axis_name: optional mapped axis (or tuple of axes) to synchronize over.
        Per-device moments are pooled exactly, weighted by count, in one
        `psum` (see `_pool_across`).

    Returns:
      `Moments` with `mean` and `var` of shape `x.shape` with `axes` set to 1.
      Positions with no contributing entry get mean and variance 0.
    """
    leading, trailing = _split_at_last_kept(x.ndim, axes)
    if leading and trailing:
        # Reduced axes on both sides of a kept one are not one contiguous
        # reduction. Reduce the larger block first, then pool the small
        # per-position moments exactly: GroupNorm on channels-last input
        # reduces (H, W) per channel, then pools the channels of a group;
        # BatchNorm on NCHW reduces each (H, W) row, then pools over N.
        def size(block: tuple[int, ...]) -> int:
            return math.prod(x.shape[a] for a in block)

        first, then = (
            (leading, trailing) if size(leading) >= size(trailing) else (trailing, leading)
        )
        return pool(moments(x, first, mask=mask), then, axis_name)
    dtype = stats_dtype(x.dtype)
    count, safe_count = _count(x, axes, mask)
    if _in_cache(x.shape, axes):
        # A second pass corrects the mean: for mean 1e4, std 1 in float32 the
        # plain sum is off by ~1e-3, the sum of deviations from it is exact.
        rough = jnp.sum(_masked(x.astype(dtype), mask), axes, keepdims=True) / safe_count
        rough = lax.stop_gradient(rough)
        correction = jnp.sum(_masked(x.astype(dtype) - rough, mask), axes, keepdims=True)
        mean = rough + correction / safe_count
        deviations = _masked(jnp.square(x.astype(dtype) - mean), mask)
        var = jnp.sum(deviations, axes, keepdims=True) / safe_count
    else:
        shift = lax.stop_gradient(_shift(x, axes, mask)).astype(dtype)
        sum_d, sum_d2 = _shifted_sums(x, shift, mask, axes)
        mean_d = sum_d / safe_count
        var = jnp.maximum(sum_d2 / safe_count - mean_d * mean_d, 0)
        mean = shift + mean_d
    if mask is not None:
        mean = jnp.where(count > 0, mean, 0)
    if axis_name is not None:
        return _pool_across(Moments(mean, var, count), axis_name)
    return Moments(mean, var, count)


def _shifted_sums(
    x: jax.Array, shift: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """`sum(d)` and `sum(d**2)` over `axes` of `d = x - shift`, masked entries left out.

    Runs of adjacent reduced (or kept) axes are merged first, e.g. NHWC
    BatchNorm becomes a `(N*H*W, C)` reduction: XLA's CPU reductions are
    much faster on the merged view than on the same data at rank 5.
    """
    kinds = [a in axes for a in range(x.ndim)]
    runs = _runs(kinds)

    def merged(v: jax.Array | None) -> jax.Array | None:
        return None if v is None else _merge_runs(v, x.shape, runs)

    merged_axes = tuple(i for i, run in enumerate(runs) if kinds[run[0]])
    sums = _merged_shifted_sums(merged(x), merged(shift), merged(mask), merged_axes)
    shape = [1 if kind else n for kind, n in zip(kinds, x.shape, strict=True)]
    return sums[0].reshape(shape), sums[1].reshape(shape)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _merged_shifted_sums(
    x: jax.Array, shift: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """`_shifted_sums` on the merged view.

    Each sum is its own reduction that reads `x` directly: `_distinct` keeps
    XLA from merging the two subtractions into one full-size `d`, which
    would be written out and read back twice. The JVP rule below states the
    derivatives with fresh expressions in `x` for the same reason; it makes
    reverse mode a pair of elementwise terms in the final `dx` pass rather
    than extra passes over the input.
    """
    dtype = shift.dtype
    x_1, x_2, shift_1, shift_2 = _distinct(x, x, shift, shift)
    d_1 = _masked(x_1.astype(dtype) - shift_1, mask)
    d_2 = _masked(jnp.square(x_2.astype(dtype) - shift_2), mask)
    return jnp.sum(d_1, axes, keepdims=True), jnp.sum(d_2, axes, keepdims=True)


@_merged_shifted_sums.defjvp
def _merged_shifted_sums_jvp(axes, primals, tangents):
    x, shift, mask = primals
    x_dot, shift_dot, _ = tangents
    sums = _merged_shifted_sums(x, shift, mask, axes)
    fresh_x, fresh_shift = _distinct(x, shift)
    d = fresh_x.astype(shift.dtype) - fresh_shift
    d_dot = _masked(x_dot.astype(shift.dtype) - shift_dot, mask)
    sum_dot = jnp.sum(d_dot, axes, keepdims=True)
    return sums, (sum_dot, 2 * jnp.sum(d * d_dot, axes, keepdims=True))


def _runs(kinds: list[bool]) -> list[list[int]]:
    """Groups axes into runs of adjacent axes of the same kind."""
    runs: list[list[int]] = []
    for a, kind in enumerate(kinds):
        if runs and kinds[runs[-1][0]] == kind:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


def _merge_runs(v: jax.Array, shape: tuple[int, ...], runs: list[list[int]]) -> jax.Array:
    """Reshapes `v` (broadcastable to `shape`, same rank) to one axis per run.

    A run where `v` is broadcast along some axes but not others is
    broadcast in full first (only masks need this, and they are small).
    """
    for run in runs:
        if len({v.shape[a] == 1 for a in run}) > 1:
            v = jnp.broadcast_to(v, [shape[a] if a in run else n for a, n in enumerate(v.shape)])
    return v.reshape([math.prod(v.shape[a] for a in run) for run in runs])


def _split_at_last_kept(ndim: int, axes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The reduced axes before the last kept axis, and those after it."""
    last_kept = max((a for a in range(ndim) if a not in axes), default=-1)
    return tuple(a for a in axes if a < last_kept), tuple(a for a in axes if a > last_kept)


def _masked(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, 0)


def _distinct(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The same arrays, as values XLA will not merge with other uses.

    XLA's common-subexpression elimination turns two identical full-size
    expressions, such as `x - shift` (or a bfloat16 `x` converted to
    float32) feeding two reductions, into one whose result is materialized
    for both. An optimization barrier costs nothing (it copies no data) and
    keeps each use a separate expression that fuses into its own consumer.
    """
    return lax.optimization_barrier(arrays)


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
    if _in_cache(x.shape, axes):
        sum_squares = jnp.sum(_masked(jnp.square(x.astype(dtype)), mask), axes, keepdims=True)
    else:
        shape = [1 if a in axes else n for a, n in enumerate(x.shape)]
        _, sum_squares = _shifted_sums(x, jnp.zeros(shape, dtype), mask, axes)
    return sum_squares / _count(x, axes, mask)[1]


def _count(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None
) -> tuple[int | jax.Array, int | jax.Array]:
    """How many entries contribute per kept position, and that count floored at 1."""
    if mask is None:
        count = math.prod(x.shape[a] for a in axes)
        return count, count
    # Axes the mask does not span count every entry along them.
    repeats = math.prod(x.shape[a] for a in axes if mask.shape[a] == 1)
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=stats_dtype(x.dtype)) * repeats
    return count, jnp.maximum(count, 1)


def _shift(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None) -> jax.Array:
    """An entry of `x` per kept position that contributes to the statistics.

    Without a mask it is the first entry along `axes`. With a mask that is the
    same for every kept position (BatchNorm's), it is the first unmasked
    entry, found on the mask alone. Otherwise, or when the mask is sharded
    explicitly over a mesh, the masked mean serves, at the price of one extra
    read of `x`.
    """
    if mask is None:
        return _take_entry(x, axes, (0,) * len(axes))
    varies_per_kept = any(mask.shape[a] != 1 for a in range(x.ndim) if a not in axes)
    if varies_per_kept or _explicitly_sharded_axes(mask):
        masked = jnp.where(mask, x.astype(stats_dtype(x.dtype)), 0)
        return jnp.sum(masked, axis=axes, keepdims=True) / _count(x, axes, mask)[1]
    first = jnp.unravel_index(jnp.argmax(mask.reshape(-1)), mask.shape)
    return _take_entry(x, axes, tuple(first[a] for a in axes))


def _take_entry(x: jax.Array, axes: tuple[int, ...], index: tuple) -> jax.Array:
    """`x` at `index` along `axes` (kept with size 1), whole along the others.

    An axis that `x` is explicitly sharded over (sharded `jit` on a mesh with
    explicit axes) cannot be sliced to size 1; it is indexed with a gather
    whose small result is replicated instead.
    """
    sharded = _explicitly_sharded_axes(x) & set(axes)
    starts = [0] * x.ndim
    sizes = list(x.shape)
    for a, i in zip(axes, index, strict=True):
        if a not in sharded:
            starts[a], sizes[a] = i, 1
    entry = lax.dynamic_slice(x, starts, sizes)
    for a, i in zip(axes, index, strict=True):
        if a in sharded:
            sharding = jax.typeof(entry).sharding
            spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
            spec[a] = None
            where = [slice(None)] * x.ndim
            where[a] = jnp.reshape(i, (1,))
            out = NamedSharding(sharding.mesh, PartitionSpec(*spec))
            entry = entry.at[tuple(where)].get(out_sharding=out)
    return entry


def _explicitly_sharded_axes(x: jax.Array) -> set[int]:
    """Axes of `x` whose type says they are split over an explicit mesh axis."""
    spec = getattr(jax.typeof(x).sharding, "spec", None) or ()
    return {a for a, names in enumerate(spec) if names is not None}


def _pool_across(local: Moments, axis_name: AxisName) -> Moments:
    """Pools per-device moments exactly with the parallel-variance formula.

    Each device writes its `(count, mean, var)` into its own slot of a zero
    array and one `psum` fills every slot everywhere: an all-gather whose
    result is replicated, and `_combine` pools the slots. A `psum` is
    used instead of `all_gather` because its result is typed as replicated
    under `shard_map` (so it may leave through `P()`) and it is transposed
    correctly under `shard_map`, `vmap` and `pmap` alike.
    """
    count = jnp.broadcast_to(jnp.asarray(local.count, local.mean.dtype), local.mean.shape)
    mine = jnp.stack([count, local.mean, local.var])
    num_devices = lax.axis_size(axis_name)
    slots = jnp.zeros((num_devices, *mine.shape), mine.dtype)
    gathered = lax.psum(slots.at[lax.axis_index(axis_name)].set(mine), axis_name)
    pooled = _combine(gathered[:, 0], gathered[:, 1], gathered[:, 2], (0,))
    pooled = Moments(pooled.mean[0], pooled.var[0], pooled.count[0])
    if isinstance(local.count, int):
        return pooled._replace(count=local.count * num_devices)
    return pooled


def pool(local: Moments, axes: tuple[int, ...], axis_name: AxisName | None) -> Moments:
    """The moments of the union of the parts of `local` along its `axes`.

    Exact (the parallel-variance formula, weighted by count), then pooled
    across `axis_name` when given. E.g. GroupNorm pools per-channel moments
    over the channels of a group; ghost BatchNorm pools its groups into the
    whole batch's moments.
    """
    count = jnp.broadcast_to(jnp.asarray(local.count, local.mean.dtype), local.mean.shape)
    pooled = _combine(count, local.mean, local.var, axes)
    if isinstance(local.count, int):
        pooled = pooled._replace(count=local.count * math.prod(local.mean.shape[a] for a in axes))
    if axis_name is not None:
        return _pool_across(pooled, axis_name)
    return pooled


def _combine(
    counts: jax.Array, means: jax.Array, variances: jax.Array, axes: tuple[int, ...]
) -> Moments:
    """The parallel-variance formula: moments of the union of parts along `axes`.

    Pooling deviations from the pooled mean, rather than raw second moments,
    keeps it stable for large means. Parts with count 0 do not contribute.
    """
    total = jnp.sum(counts, axis=axes, keepdims=True)
    safe_total = jnp.maximum(total, 1)
    mean = jnp.sum(counts * means, axis=axes, keepdims=True) / safe_total
    spread = variances + jnp.square(means - mean)
    var = jnp.sum(counts * spread, axis=axes, keepdims=True) / safe_total
    return Moments(mean, var, total)


def broadcast_to_axes(p: jax.Array | None, ndim: int, axes: tuple[int, ...]) -> jax.Array | None:
    """Reshapes a parameter laid out over `axes` so it broadcasts at rank `ndim`."""
    if p is None:
        return None
    shape = [1] * ndim
    for a, n in zip(axes, np.shape(p), strict=True):
        shape[a] = n
    return jnp.reshape(p, shape)


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
) -> jax.Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias`, in `x`'s dtype.

    All statistics and parameters must already broadcast against `x` at its
    rank. The arithmetic runs in the statistics dtype and fuses into one
    elementwise pass. Subtracting the mean before scaling keeps the result
    exact for inputs with a large mean.
    """
    dtype = stats_dtype(x.dtype)
    mean = mean.astype(dtype)
    reduced = tuple(a for a in range(x.ndim) if mean.shape[a] == 1 < x.shape[a])
    if _in_cache(x.shape, reduced):
        # XLA fuses the statistics' reductions and this pass into one loop,
        # which the form below would break.
        y = (x.astype(dtype) - mean) * lax.rsqrt(var.astype(dtype) + epsilon)
        y = y if scale is None else y * scale.astype(dtype)
        return (y if bias is None else y + bias.astype(dtype)).astype(x.dtype)
    factor = lax.rsqrt(var.astype(dtype) + epsilon)
    if scale is not None:
        factor = factor * scale.astype(dtype)
    # `(x - mean) * factor + bias`, written so that the gradient reaches
    # `mean` through a per-feature term: its cotangent is then `-factor`
    # times the bias's (a sum autodiff takes anyway), not a third reduction
    # over a materialized `g * factor`. The values are unchanged:
    # `mean - stop_gradient(mean)` is exactly 0.
    fixed_mean = lax.stop_gradient(mean)
    offset = -(mean - fixed_mean) * factor
    if bias is not None:
        offset = offset + bias.astype(dtype)
    (x,) = _distinct(x)  # its conversion is not shared with the gradient's `dx` pass
    # On a view with merged axes (e.g. GroupNorm's (N, H, W, G, C // G) as
    # (N, H*W, C)), the sums autodiff takes for the coefficients are the
    # fast, contiguous kind.
    shape = jnp.broadcast_shapes(fixed_mean.shape, factor.shape, offset.shape)
    runs = _runs([n == 1 for n in shape])
    # The barrier makes XLA compute the small coefficients once, not per entry.
    fixed_mean, factor, offset = _distinct(
        *(
            _merge_runs(jnp.broadcast_to(c, shape), shape, runs)
            for c in (fixed_mean, factor, offset)
        )
    )
    y = (_merge_runs(x.astype(dtype), x.shape, runs) - fixed_mean) * factor + offset
    return y.reshape(x.shape).astype(x.dtype)
