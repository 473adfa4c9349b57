"""Converters for Keras's `keras.layers.BatchNormalization` weights.

Keras's `momentum` and `axis=-1` mean what bnjax's do; its epsilon defaults
to 1e-3 (bnjax's to 1e-5).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from bnjax._src.convert._common import as_jax, as_jax_or_none
from bnjax._src.types import BatchStats, NormParams

_KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


def from_keras_batchnorm(
    weights: Mapping[str, Any] | Sequence[Any], *, count: int = 0
) -> tuple[NormParams, BatchStats]:
    """`(params, state)` from a `keras.layers.BatchNormalization`'s weights.

    Keras's `momentum` means what bnjax's does (default 0.99 there), its
    `axis=-1` is bnjax's, but its epsilon defaults to 1e-3: pass
    `epsilon=1e-3` to bnjax (or the layer's `epsilon`). Keras does not count
    updates: `count` is given.

    Args:
      weights: `{w.name: w.numpy() for w in layer.weights}`
        (`gamma`, `beta`, `moving_mean`, `moving_variance`; names may carry
        the layer's path, `"batch_normalization/gamma"`), or
        `layer.get_weights()` of a layer with both or neither of `scale` and
        `center` (4 or 2 arrays; with only one of them use the mapping).
      count: the number of updates to record in `state.count`. Default 0.

    Returns:
      `(NormParams(scale, bias), BatchStats(mean, var, count))`.

    Raises:
      ValueError: a sequence of another length than 4 or 2; no moving
        statistics.

    Examples:
      >>> params, state = bnjax.convert.from_keras_batchnorm(
      ...     [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)])
      >>> params.scale.shape
      (3,)
    """
    if isinstance(weights, Mapping):
        named = {str(key).rsplit("/", 1)[-1]: value for key, value in weights.items()}
    elif len(weights) in (2, 4):
        named = dict(zip(_KERAS_NAMES[4 - len(weights) :], weights, strict=True))
    else:
        raise ValueError(
            "`weights` must be `layer.get_weights()` with 4 arrays (scale and center) or "
            f"2 (neither), got {len(weights)}. For other layers pass "
            "`{w.name: w.numpy() for w in layer.weights}`."
        )
    if "moving_mean" not in named or "moving_variance" not in named:
        raise ValueError(
            f"`weights` must hold `moving_mean` and `moving_variance`, got {sorted(named)}."
        )
    params = NormParams(as_jax_or_none(named.get("gamma")), as_jax_or_none(named.get("beta")))
    state = BatchStats(
        as_jax(named["moving_mean"]),
        as_jax(named["moving_variance"]),
        jnp.asarray(count, jnp.int32),
    )
    return params, state


def to_keras_batchnorm(params: NormParams, state: BatchStats) -> list[np.ndarray]:
    """`layer.set_weights(...)`'s list for a Keras `BatchNormalization`.

    In Keras's order `[gamma, beta, moving_mean, moving_variance]`, without
    the parameters that are None (build the layer with `scale=False` or
    `center=False` to match). `count` is dropped.

    Examples:
      >>> len(bnjax.convert.to_keras_batchnorm(*bnjax.batchnorm_init(3, use_bias=False)))
      3
    """
    arrays = [params.scale, params.bias, state.mean, state.var]
    return [np.array(a) for a in arrays if a is not None]
