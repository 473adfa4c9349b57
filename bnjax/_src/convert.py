"""Lossless conversion of normalization layers to and from other frameworks.

Each pair `from_X_...` / `to_X_...` copies the stored values as they are (no
arithmetic, so a round trip is bit-exact) and maps the names and shapes:

| bnjax | PyTorch | Flax linen | Haiku | Keras |
| --- | --- | --- | --- | --- |
| `params.scale` | `weight` | `params/scale` | `scale` `[1,..,1,C]` | `gamma` |
| `params.bias` | `bias` | `params/bias` | `offset` `[1,..,1,C]` | `beta` |
| `state.mean` | `running_mean` | `batch_stats/mean` | `mean_ema/average` | `moving_mean` |
| `state.var` | `running_var` | `batch_stats/var` | `var_ema/average` | `moving_variance` |
| `state.count` | `num_batches_tracked` | (none) | `mean_ema/counter` | (none) |
| momentum | `1 - momentum` | `momentum` | `decay_rate` | `momentum` |
| epsilon default | 1e-5 | 1e-5 | (required) | 1e-3 |

None of these imports the other framework: arrays go in as anything
`numpy.asarray` takes (torch tensors included) and come out as JAX arrays
(bnjax, Flax, Haiku) or as writable numpy copies (PyTorch, Keras).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src.types import BatchStats, NormParams


def _numpy(value: Any) -> np.ndarray:
    """A numpy array of `value`, also from a torch tensor (detached, on the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _jax(value: Any) -> jax.Array | None:
    return None if value is None else jnp.asarray(_numpy(value))


# --- PyTorch ----------------------------------------------------------------


def from_torch_momentum(momentum: float | None) -> float | None:
    """bnjax's `momentum` for a PyTorch BatchNorm's `momentum`: `1 - momentum`.

    PyTorch updates `running = (1 - m) * running + m * batch`; bnjax updates
    `running = momentum * running + (1 - momentum) * batch`. `None` (the
    cumulative average) means the same in both and stays `None`.

    Example:
      >>> bnjax.convert.from_torch_momentum(0.1)
      0.9
    """
    return None if momentum is None else 1.0 - momentum


def to_torch_momentum(momentum: float | None) -> float | None:
    """PyTorch's `momentum` for bnjax's `momentum`: `1 - momentum`; None stays None.

    Example:
      >>> bnjax.convert.to_torch_momentum(0.9)
      0.09999999999999998
    """
    return None if momentum is None else 1.0 - momentum


def from_torch_batchnorm(
    state_dict: Mapping[str, Any], *, prefix: str = ""
) -> tuple[NormParams, BatchStats]:
    """`(params, state)` from a `torch.nn.BatchNorm1d/2d/3d` (or SyncBatchNorm) state dict.

    The stored values are copied as they are. PyTorch's `running_var` is the
    running average of unbiased batch variances; eval mode uses it exactly as
    bnjax uses `state.var`, so eval outputs agree. To continue training the
    PyTorch way, call `batchnorm_apply` with `unbiased_running_var=True` and
    `momentum=from_torch_momentum(module.momentum)`. PyTorch takes the
    channels on axis 1 (`NCHW`): pass `axis=1`, or transpose to channels
    last.

    Args:
      state_dict: `module.state_dict()`, or a whole model's with `prefix`.
        `weight` and `bias` are absent for `affine=False`;
        `num_batches_tracked` becomes `count` (0 when absent).
      prefix: prepended to every key, e.g. `"layer1.bn."`. Default "".

    Returns:
      `(NormParams(scale, bias), BatchStats(mean, var, count))`, JAX arrays
      of the stored dtypes (`count` int32).

    Raises:
      ValueError: the running statistics are missing
        (`track_running_stats=False`: such a layer always uses batch
        statistics, which bnjax's eval mode does not).

    Example:
      >>> sd = {"weight": np.ones(3, np.float32), "bias": np.zeros(3, np.float32),
      ...       "running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32),
      ...       "num_batches_tracked": np.array(7)}
      >>> params, state = bnjax.convert.from_torch_batchnorm(sd)
      >>> state.mean.shape, state.count
      ((3,), Array(7, dtype=int32))
    """
    for key in ("running_mean", "running_var"):
        if prefix + key not in state_dict:
            raise ValueError(
                f"`state_dict` must hold `{prefix}{key}`, got keys {sorted(state_dict)}. "
                "A BatchNorm with `track_running_stats=False` has no running statistics."
            )
    count = state_dict.get(prefix + "num_batches_tracked", 0)
    params = from_torch_layernorm(state_dict, prefix=prefix)
    state = BatchStats(
        mean=_jax(state_dict[prefix + "running_mean"]),
        var=_jax(state_dict[prefix + "running_var"]),
        count=jnp.asarray(_numpy(count).astype(np.int32)),
    )
    return params, state


def to_torch_batchnorm(
    params: NormParams, state: BatchStats, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """A `torch.nn.BatchNorm*d` state dict of numpy arrays; see `from_torch_batchnorm`.

    Load it with
    `module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})`.
    `num_batches_tracked` is `count` as int64; `weight` and `bias` are left
    out where `params` has None (a module with `affine=False`).

    Example:
      >>> sd = bnjax.convert.to_torch_batchnorm(*bnjax.batchnorm_init(3))
      >>> sorted(sd)
      ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    out = _affine_dict(params, "weight", "bias", prefix)
    out[prefix + "running_mean"] = np.array(state.mean)
    out[prefix + "running_var"] = np.array(state.var)
    out[prefix + "num_batches_tracked"] = np.array(state.count, np.int64)
    return out


def from_torch_layernorm(state_dict: Mapping[str, Any], *, prefix: str = "") -> NormParams:
    """`NormParams` from a `torch.nn.LayerNorm` state dict.

    `weight` and `bias` have the shape `normalized_shape`, as bnjax's
    LayerNorm parameters for `axis=(-k, ..., -1)` with `k` the length of
    `normalized_shape`; either may be absent (`elementwise_affine=False`,
    `bias=False`). PyTorch's epsilon defaults to 1e-5, as bnjax's.

    Example:
      >>> params = bnjax.convert.from_torch_layernorm({"weight": np.ones((4, 5))})
      >>> params.scale.shape, params.bias
      ((4, 5), None)
    """
    weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
    return NormParams(_jax(weight), _jax(bias))


def to_torch_layernorm(params: NormParams, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A `torch.nn.LayerNorm` state dict of numpy arrays; see `from_torch_layernorm`.

    Example:
      >>> sorted(bnjax.convert.to_torch_layernorm(bnjax.layernorm_init((4, 5))))
      ['bias', 'weight']
    """
    return _affine_dict(params, "weight", "bias", prefix)


def from_torch_groupnorm(state_dict: Mapping[str, Any], *, prefix: str = "") -> NormParams:
    """`NormParams` from a `torch.nn.GroupNorm` state dict (`weight`, `bias` of `(C,)`).

    Call `groupnorm_apply` with `num_groups=module.num_groups`,
    `epsilon=module.eps` and `axis=1` for PyTorch's channels-first layout.
    Groups are contiguous blocks of channels in both.

    Example:
      >>> params = bnjax.convert.from_torch_groupnorm({"weight": np.ones(6), "bias": np.zeros(6)})
      >>> params.scale.shape
      (6,)
    """
    return from_torch_layernorm(state_dict, prefix=prefix)


def to_torch_groupnorm(params: NormParams, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A `torch.nn.GroupNorm` state dict of numpy arrays; see `from_torch_groupnorm`.

    Example:
      >>> sorted(bnjax.convert.to_torch_groupnorm(bnjax.groupnorm_init(6)))
      ['bias', 'weight']
    """
    return _affine_dict(params, "weight", "bias", prefix)


def _affine_dict(params: NormParams, scale: str, bias: str, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    if params.scale is not None:
        out[prefix + scale] = np.array(params.scale)
    if params.bias is not None:
        out[prefix + bias] = np.array(params.bias)
    return out


# --- Flax linen ---------------------------------------------------------------


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

    Example:
      >>> variables = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
      ...              "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
      >>> params, state = bnjax.convert.from_flax_batchnorm(variables)
      >>> state.count
      Array(0, dtype=int32)
    """
    weights = variables.get("params", {})
    batch_stats = variables["batch_stats"]
    params = NormParams(_jax(weights.get("scale")), _jax(weights.get("bias")))
    state = BatchStats(
        _jax(batch_stats["mean"]), _jax(batch_stats["var"]), jnp.asarray(count, jnp.int32)
    )
    return params, state


def to_flax_batchnorm(params: NormParams, state: BatchStats) -> dict[str, dict[str, jax.Array]]:
    """Flax linen `nn.BatchNorm` variables; see `from_flax_batchnorm`.

    `count` has no Flax counterpart and is dropped; `params` is left out when
    both `scale` and `bias` are None, as Flax does.

    Example:
      >>> variables = bnjax.convert.to_flax_batchnorm(*bnjax.batchnorm_init(3))
      >>> sorted(variables), sorted(variables["batch_stats"])
      (['batch_stats', 'params'], ['mean', 'var'])
    """
    weights = {}
    if params.scale is not None:
        weights["scale"] = jnp.asarray(params.scale)
    if params.bias is not None:
        weights["bias"] = jnp.asarray(params.bias)
    variables = {"batch_stats": {"mean": jnp.asarray(state.mean), "var": jnp.asarray(state.var)}}
    if weights:
        variables["params"] = weights
    return variables


# --- Haiku --------------------------------------------------------------------


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

    Example:
      >>> hk_params = {"batch_norm": {"scale": jnp.ones((1, 3)), "offset": jnp.zeros((1, 3))}}
      >>> ema = {"hidden": jnp.zeros((1, 3)), "average": jnp.ones((1, 3)),
      ...        "counter": jnp.array(2, jnp.int32)}
      >>> hk_state = {"batch_norm/~/mean_ema": ema, "batch_norm/~/var_ema": ema}
      >>> params, state = bnjax.convert.from_haiku_batchnorm(hk_params, hk_state)
      >>> params.scale.shape, state.count
      ((3,), Array(2, dtype=int32))
    """
    weights = params.get(name, {})
    mean_ema, var_ema = state[f"{name}/~/mean_ema"], state[f"{name}/~/var_ema"]
    new_params = NormParams(
        _channels(weights.get("scale"), "scale"), _channels(weights.get("offset"), "offset")
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

    Example:
      >>> hk_params, hk_state = bnjax.convert.to_haiku_batchnorm(
      ...     *bnjax.batchnorm_init(3), decay_rate=0.9, ndim=4)
      >>> hk_params["batch_norm"]["scale"].shape, sorted(hk_state)
      ((1, 1, 1, 3), ['batch_norm/~/mean_ema', 'batch_norm/~/var_ema'])
    """
    shape = [1] * ndim
    shape[axis] = -1
    weights = {}
    if params.scale is not None:
        weights["scale"] = jnp.reshape(params.scale, shape)
    if params.bias is not None:
        weights["offset"] = jnp.reshape(params.bias, shape)
    count = jnp.asarray(state.count, jnp.int32)

    def ema(average: jax.Array) -> dict[str, jax.Array]:
        average = jnp.reshape(average, shape)
        debias = 1 - jnp.power(jnp.asarray(decay_rate, average.dtype), count)
        return {"counter": count, "hidden": average * debias, "average": average}

    hk_state = {f"{name}/~/mean_ema": ema(state.mean), f"{name}/~/var_ema": ema(state.var)}
    return ({name: weights} if weights else {}), hk_state


def _channels(value: Any, what: str) -> jax.Array | None:
    """`[1, ..., 1, C, 1, ...]` to `(C,)`; the stored values are unchanged."""
    if value is None:
        return None
    value = _jax(value)
    if sum(n != 1 for n in value.shape) > 1:
        raise ValueError(
            f"`{what}` must have one axis of size C and the others of size 1, "
            f"got shape {value.shape}."
        )
    return value.reshape(-1)


# --- Keras --------------------------------------------------------------------

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

    Example:
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
    params = NormParams(_jax(named.get("gamma")), _jax(named.get("beta")))
    state = BatchStats(
        _jax(named["moving_mean"]), _jax(named["moving_variance"]), jnp.asarray(count, jnp.int32)
    )
    return params, state


def to_keras_batchnorm(params: NormParams, state: BatchStats) -> list[np.ndarray]:
    """`layer.set_weights(...)`'s list for a Keras `BatchNormalization`.

    In Keras's order `[gamma, beta, moving_mean, moving_variance]`, without
    the parameters that are None (build the layer with `scale=False` or
    `center=False` to match). `count` is dropped.

    Example:
      >>> len(bnjax.convert.to_keras_batchnorm(*bnjax.batchnorm_init(3, use_bias=False)))
      3
    """
    arrays = [params.scale, params.bias, state.mean, state.var]
    return [np.array(a) for a in arrays if a is not None]
