"""Converters for Haiku's `hk.BatchNorm` parameters and state.

Haiku's `decay_rate` is bnjax's `momentum`; its parameters and statistics
have shape `[1, ..., 1, C]`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src.convert._common import affine_dict, as_jax
from bnjax._src.types import BatchStats, NormParams


def from_haiku_batchnorm(
    params: Mapping[str, Any], state: Mapping[str, Any], *, name: str = "batch_norm"
) -> tuple[NormParams, BatchStats]:
    """`(params, state)` from an `hk.BatchNorm`'s parameters and state.

    Haiku keeps `scale` and `offset` with shape `[1, ..., 1, C]` (the input's
    rank, `C` on the channel axis) and each running statistic in an
    `hk.ExponentialMovingAverage` whose state is `hidden`, `average` and
    `counter`; its eval mode uses `average`, which becomes `mean`/`var`,
    and `counter` becomes `count`. Haiku's `decay_rate` is bnjax's
    `momentum`; its `eps` has no default. Its EMA is zero-debiased, so
    training continued in bnjax (not debiased) follows a different path
    from Haiku's, though eval outputs agree exactly.

    Args:
      params: the transformed function's parameters (all modules).
      state: the transformed function's state (all modules).
      name: the module's full name, e.g. `"mlp/~/batch_norm"`. Default
        `"batch_norm"`.

    Returns:
      `(NormParams(scale, bias), BatchStats(mean, var, count))`, fields `(C,)`.

    Examples:
      >>> hk_params = {"batch_norm": {"scale": jnp.ones((1, 3)), "offset": jnp.zeros((1, 3))}}
      >>> ema = {"hidden": jnp.zeros((1, 3)), "average": jnp.ones((1, 3)),
      ...        "counter": jnp.array(2, jnp.int32)}
      >>> hk_state = {"batch_norm/~/mean_ema": ema, "batch_norm/~/var_ema": ema}
      >>> params, state = bnjax.convert.from_haiku_batchnorm(hk_params, hk_state)
      >>> params.scale.shape, state.count
      ((3,), Array(2, dtype=int32))
    """
    weights = params.get(name, {})
    scale, offset = weights.get("scale"), weights.get("offset")
    mean_ema, var_ema = state[f"{name}/~/mean_ema"], state[f"{name}/~/var_ema"]
    new_params = NormParams(
        None if scale is None else _channels(scale, "scale"),
        None if offset is None else _channels(offset, "offset"),
    )
    new_state = BatchStats(
        _channels(mean_ema["average"], "mean_ema/average"),
        _channels(var_ema["average"], "var_ema/average"),
        jnp.asarray(mean_ema["counter"], jnp.int32),
    )
    return new_params, new_state


def to_haiku_batchnorm(
    params: NormParams,
    state: BatchStats,
    *,
    decay_rate: float,
    ndim: int = 2,
    axis: int = -1,
    name: str = "batch_norm",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`hk.BatchNorm` parameters and state; see `from_haiku_batchnorm`.

    `average` is `state.mean` (`state.var`), `counter` is `count`, and
    `hidden` is what Haiku's zero-debiased EMA would hold with that average:
    `average * (1 - decay_rate**count)`, so that training continued in
    Haiku carries on from the converted values. (Going from Haiku and back,
    `hidden` is recomputed and equals Haiku's up to one rounding.)

    Args:
      params: `NormParams`, fields `(C,)` or None.
      state: `BatchStats`, `mean` and `var` of shape `(C,)`.
      decay_rate: the `decay_rate` the Haiku module is built with (bnjax's
        `momentum`), in [0, 1).
      ndim: the rank of the module's inputs; parameters and statistics get
        shape `[1, ..., 1, C]` of that rank. Default 2.
      axis: the channel axis (Haiku's `data_format`): -1 for
        `channels_last`, 1 for `channels_first`. Default -1.
      name: the module's full name. Default `"batch_norm"`.

    Returns:
      `(hk_params, hk_state)`: `{name: {'scale', 'offset'}}` (without the
      ones that are None) and
      `{name + '/~/mean_ema': {'hidden', 'average', 'counter'}, ...var_ema}`.

    Examples:
      >>> hk_params, hk_state = bnjax.convert.to_haiku_batchnorm(
      ...     *bnjax.batchnorm_init(3), decay_rate=0.9, ndim=4)
      >>> hk_params["batch_norm"]["scale"].shape, sorted(hk_state)
      ((1, 1, 1, 3), ['batch_norm/~/mean_ema', 'batch_norm/~/var_ema'])
    """
    shape = [1] * ndim
    shape[axis] = -1
    weights = affine_dict(params, "scale", "offset", convert=lambda a: jnp.reshape(a, shape))
    count = jnp.asarray(state.count, jnp.int32)

    def ema(average: jax.Array) -> dict[str, jax.Array]:
        average = jnp.reshape(average, shape)
        debias = 1 - jnp.power(jnp.asarray(decay_rate, average.dtype), count)
        return {"counter": count, "hidden": average * debias, "average": average}

    hk_state = {f"{name}/~/mean_ema": ema(state.mean), f"{name}/~/var_ema": ema(state.var)}
    return ({name: weights} if weights else {}), hk_state


def _channels(value: Any, what: str) -> jax.Array:
    """`[1, ..., 1, C, 1, ...]` to `(C,)`; the stored values are unchanged."""
    array = as_jax(value)
    if sum(n != 1 for n in array.shape) > 1:
        raise ValueError(
            f"`{what}` must have one axis of size C and the others of size 1, "
            f"got shape {array.shape}."
        )
    return array.reshape(-1)
