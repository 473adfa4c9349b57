"""Converters for Flax linen's `nn.BatchNorm` variables.

Flax's `momentum`, `epsilon` (1e-5) and `axis=-1` mean what bnjax's do.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src.convert._common import affine_dict, as_jax, as_jax_or_none
from bnjax._src.types import BatchStats, NormParams


def from_flax_batchnorm(
    variables: Mapping[str, Any], *, count: int = 0
) -> tuple[NormParams, BatchStats]:
    """`(params, state)` from a Flax linen `nn.BatchNorm`'s variables.

    Flax's `momentum` and `epsilon` (1e-5) mean what bnjax's do, and its
    `axis=-1` is bnjax's. Flax does not count updates: `count` is given.

    Args:
      variables: `{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`
        for one BatchNorm (e.g. `variables['params']['BatchNorm_0']` and
        `variables['batch_stats']['BatchNorm_0']` put together); `scale` or
        `bias` (or `params`) is absent when switched off.
      count: the number of updates to record in `state.count`. Default 0.

    Returns:
      `(NormParams(scale, bias), BatchStats(mean, var, count))`.

    Examples:
      >>> variables = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
      ...              "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
      >>> params, state = bnjax.convert.from_flax_batchnorm(variables)
      >>> state.count
      Array(0, dtype=int32)
    """
    weights = variables.get("params", {})
    batch_stats = variables["batch_stats"]
    params = NormParams(as_jax_or_none(weights.get("scale")), as_jax_or_none(weights.get("bias")))
    state = BatchStats(
        as_jax(batch_stats["mean"]), as_jax(batch_stats["var"]), jnp.asarray(count, jnp.int32)
    )
    return params, state


def to_flax_batchnorm(params: NormParams, state: BatchStats) -> dict[str, dict[str, jax.Array]]:
    """Flax linen `nn.BatchNorm` variables; see `from_flax_batchnorm`.

    `count` has no Flax counterpart and is dropped; `params` is left out when
    both `scale` and `bias` are None, as Flax does.

    Examples:
      >>> variables = bnjax.convert.to_flax_batchnorm(*bnjax.batchnorm_init(3))
      >>> sorted(variables), sorted(variables["batch_stats"])
      (['batch_stats', 'params'], ['mean', 'var'])
    """
    weights = affine_dict(params, "scale", "bias", convert=jnp.asarray)
    variables = {"batch_stats": {"mean": jnp.asarray(state.mean), "var": jnp.asarray(state.var)}}
    if weights:
        variables["params"] = weights
    return variables
