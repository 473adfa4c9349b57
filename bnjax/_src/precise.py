"""Precise BatchNorm statistics: the population moments over many batches."""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._src import stats
from bnjax._src.types import BatchStats, CollectedStats


def precise_batch_stats(
    stats_fn: Callable[[Any, Any], Any], state: Any, batches: Iterable[Any]
) -> Any:
    """Re-estimates every BatchNorm's running statistics over many batches.

    The running statistics of training are an exponential average of batch
    statistics taken while the weights changed. For evaluation, the mean
    and variance of each BatchNorm's input over a whole data set, with the
    final weights, are usually better. This runs `stats_fn` on each batch
    and sets each BatchNorm's running `mean` to the mean and `var` to the
    biased variance of all the entries its input had over all `batches`
    (pooled, each batch weighted by how many entries it contributed: not
    an average of per-batch variances). Each layer's input is computed as
    in training: earlier BatchNorm layers normalize with their batch's own
    statistics.

    How: each `BatchStats` in `state` is replaced by a `CollectedStats`,
    a type of its own, so `stats_fn` is traced afresh under `jax.jit`. Every
    training-mode `batchnorm_apply` and `batchrenorm_apply` given one
    normalizes as in training and pools this batch's mean, biased variance
    and number of contributing entries into it: of the whole batch for
    ghost batches, of the unmasked entries with `mask`, across devices with
    `axis_name`, and over every call when a layer is applied several times
    (a shared block, layers stacked for `lax.scan`). The batches' results
    are then merged on the host in float64 with exact integer counts (the
    parallel formula of Chan et al.), which keeps the merge exact to
    float32 precision however many batches there are; each batch costs one
    small transfer, which overlaps with the next batch's computation.

    Args:
      stats_fn: `stats_fn(state, batch) -> new_state`, the model's
        training-mode forward pass reduced to its new state, e.g.
        `lambda s, b: model_apply(params, s, b, train=True)[1]`. It must
        call every BatchNorm layer in training mode and return the state
        in `state`'s structure.
      state: any pytree containing `BatchStats` nodes (for example a dict
        of them, or `BatchStats` with leading axes for layers stacked for
        `lax.scan`).
      batches: an iterable of batches, each passed to `stats_fn`. Batch
        sizes may differ (each new shape is traced once).

    Returns:
      `state` with the `mean` and `var` of every `BatchStats` replaced by the
      precise statistics, in their dtype, and everything else, `count`
      included, unchanged. A layer whose input had no unmasked entry in any
      batch keeps its running statistics.

    Raises:
      ValueError: `state` has no `BatchStats`; `batches` is empty;
        `stats_fn` returns another structure; a layer ran in eval mode
        (raised when it is traced) or was not called at all.

    Examples:
      >>> params, state = bnjax.batchnorm_init(2)
      >>> stats_fn = lambda s, b: bnjax.batchnorm_apply(params, s, b, True)[1]
      >>> batches = [jnp.array([[0.0, 1.0], [2.0, 1.0]]), jnp.array([[4.0, 4.0]] * 2)]
      >>> state = bnjax.precise_batch_stats(stats_fn, state, batches)
      >>> state.mean, state.var
      (Array([2.5, 2.5], dtype=float32), Array([2.75, 2.25], dtype=float32))
      >>> state.count  # unchanged
      Array(0, dtype=int32)

    References:
      Wu & Johnson 2021, Rethinking "Batch" in BatchNorm, arXiv:2105.07576.
      Chan, Golub & LeVeque 1979, Updating formulae and a pairwise algorithm
      for computing sample variances.
    """
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_stats)
    leaves = [leaf for _, leaf in paths_and_leaves]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, BatchStats)]
    if not positions:
        raise ValueError(
            f"`state` must contain at least one `BatchStats`, got {jax.tree.structure(state)}."
        )
    names = {i: jax.tree_util.keystr(paths_and_leaves[i][0]) or "state" for i in positions}
    collecting = list(leaves)
    for i in positions:
        collecting[i] = _empty_collection(leaves[i])
    collecting_state = jax.tree.unflatten(treedef, collecting)

    traced = jax.jit(stats_fn)
    pooled: dict[int, _Pooled] = {}
    pending = None
    for batch in batches:
        result = traced(collecting_state, batch)
        if pending is not None:  # merge the previous batch while this one runs
            _merge(pooled, pending, treedef, positions, names)
        pending = result
    if pending is None:
        raise ValueError("`batches` must yield at least one batch, got none.")
    _merge(pooled, pending, treedef, positions, names)

    new_leaves = list(leaves)
    for i in positions:
        new_leaves[i] = pooled[i].result(leaves[i])
    return jax.tree.unflatten(treedef, new_leaves)


def collect(state: CollectedStats, batch: stats.Moments, usable: jax.Array) -> CollectedStats:
    """`state` with one call's batch moments (shape `(C,)`) pooled in, without gradient.

    A batch that is not `usable` (no contributing entry, or non-finite
    statistics under `skip_nonfinite`) is counted as a call and adds nothing.
    """
    dtype = state.mean.dtype
    batch = jax.tree.map(lax.stop_gradient, batch)
    batch = stats.Moments(
        batch.mean.astype(dtype), batch.var.astype(dtype), jnp.where(usable, batch.count, 0)
    )
    so_far = stats.Moments(state.mean, state.var, state.count)
    both = stats.Moments(
        jnp.stack([so_far.mean, batch.mean]),
        jnp.stack([so_far.var, batch.var]),
        jnp.stack([so_far.count, batch.count]).reshape(2, 1),
    )
    total = stats.pool(both, (0,))
    return state._replace(
        mean=jnp.where(usable, total.mean[0], state.mean),
        var=jnp.where(usable, total.var[0], state.var),
        count=total.count.reshape(()),
        calls=state.calls + 1,
    )


def _empty_collection(running: BatchStats) -> CollectedStats:
    """A `CollectedStats` that has pooled nothing yet, shaped like `running`."""
    count_shape = jnp.shape(running.count)
    return CollectedStats(
        running=running,
        mean=jnp.zeros_like(running.mean),
        var=jnp.zeros_like(running.var),
        count=jnp.zeros(count_shape, jnp.int32),
        calls=jnp.zeros(count_shape, jnp.int32),
    )


def _is_stats(node: Any) -> bool:
    return isinstance(node, BatchStats | CollectedStats)


class _Pooled:
    """Count, mean and sum of squared deviations over the batches so far, float64."""

    def __init__(self, n: np.ndarray, mean: np.ndarray, var: np.ndarray):
        self.n = n[..., None]
        self.mean = mean
        self.m2 = var * self.n

    def add(self, n: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
        """Chan et al.'s update: merges one batch's moments into the totals."""
        n = n[..., None]
        total = self.n + n
        safe = np.maximum(total, 1)
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / safe)
        self.m2 = self.m2 + var * n + delta**2 * (self.n * n / safe)
        self.n = total

    def result(self, old: BatchStats) -> BatchStats:
        seen = self.n > 0
        var = self.m2 / np.maximum(self.n, 1)
        mean = np.where(seen, self.mean, np.asarray(old.mean, np.float64))
        var = np.where(seen, var, np.asarray(old.var, np.float64))
        dtype = jnp.result_type(old.mean)
        return old._replace(mean=jnp.asarray(mean, dtype), var=jnp.asarray(var, dtype))


def _merge(
    pooled: dict[int, "_Pooled"],
    result: Any,
    treedef: Any,
    positions: list[int],
    names: dict[int, str],
) -> None:
    """Checks one batch's collected state and merges it into `pooled`."""
    leaves, result_treedef = jax.tree.flatten(result, is_leaf=_is_stats)
    if result_treedef != treedef or any(
        not isinstance(leaves[i], CollectedStats) for i in positions
    ):
        raise ValueError(
            "`stats_fn` must return the state in the structure of `state`, "
            f"{treedef}, got {result_treedef}."
        )
    fetched = jax.device_get([leaves[i] for i in positions])
    for i, collected in zip(positions, fetched, strict=True):
        if np.any(np.asarray(collected.calls) == 0):
            raise ValueError(
                f"The BatchNorm of `{names[i]}` was not called: `stats_fn` must run every "
                "BatchNorm layer of `state` in training mode and return its new state."
            )
        n = np.asarray(collected.count, np.float64)  # int32 per batch: exact in float64
        mean = np.asarray(collected.mean, np.float64)
        var = np.asarray(collected.var, np.float64)
        if i in pooled:
            pooled[i].add(n, mean, var)
        else:
            pooled[i] = _Pooled(n, mean, var)
