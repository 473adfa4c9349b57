"""Converters for PyTorch's BatchNorm, LayerNorm, RMSNorm and GroupNorm state dicts.

PyTorch's `momentum` is `1 - momentum` in bnjax; see `from_torch_momentum`.
Transformer Engine's `LayerNorm` and `RMSNorm` have PyTorch's state dict
keys; with `zero_centered_gamma=True` their `weight` is a zero-centered
scale, applied as `1 + weight`: load it with the same converters and apply
it with `zero_centered_scale=True`.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from bnjax._src.convert._common import affine_dict, as_jax, as_jax_or_none, as_numpy
from bnjax._src.types import BatchStats, NormParams


def from_torch_momentum(momentum: float | None) -> float | None:
    """bnjax's `momentum` for a PyTorch BatchNorm's `momentum`: `1 - momentum`.

    PyTorch updates `running = (1 - m) * running + m * batch`; bnjax updates
    `running = momentum * running + (1 - momentum) * batch`. `None` (the
    cumulative average) means the same in both and stays `None`.

    Examples:
      >>> bnjax.convert.from_torch_momentum(0.1)
      0.9
    """
    return None if momentum is None else 1.0 - momentum


def to_torch_momentum(momentum: float | None) -> float | None:
    """PyTorch's `momentum` for bnjax's `momentum`: `1 - momentum`; None stays None.

    Examples:
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

    Examples:
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
        mean=as_jax(state_dict[prefix + "running_mean"]),
        var=as_jax(state_dict[prefix + "running_var"]),
        count=jnp.asarray(as_numpy(count).astype(np.int32)),
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

    Examples:
      >>> sd = bnjax.convert.to_torch_batchnorm(*bnjax.batchnorm_init(3))
      >>> sorted(sd)
      ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    out = affine_dict(params, "weight", "bias", convert=np.array, prefix=prefix)
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

    Examples:
      >>> params = bnjax.convert.from_torch_layernorm({"weight": np.ones((4, 5))})
      >>> params.scale.shape, params.bias
      ((4, 5), None)
    """
    weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
    return NormParams(as_jax_or_none(weight), as_jax_or_none(bias))


def to_torch_layernorm(params: NormParams, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A `torch.nn.LayerNorm` state dict of numpy arrays; see `from_torch_layernorm`.

    Examples:
      >>> sorted(bnjax.convert.to_torch_layernorm(bnjax.layernorm_init((4, 5))))
      ['bias', 'weight']
    """
    return affine_dict(params, "weight", "bias", convert=np.array, prefix=prefix)


def from_torch_groupnorm(state_dict: Mapping[str, Any], *, prefix: str = "") -> NormParams:
    """`NormParams` from a `torch.nn.GroupNorm` state dict (`weight`, `bias` of `(C,)`).

    Call `groupnorm_apply` with `num_groups=module.num_groups`,
    `epsilon=module.eps` and `axis=1` for PyTorch's channels-first layout.
    Groups are contiguous blocks of channels in both.

    Examples:
      >>> params = bnjax.convert.from_torch_groupnorm({"weight": np.ones(6), "bias": np.zeros(6)})
      >>> params.scale.shape
      (6,)
    """
    return from_torch_layernorm(state_dict, prefix=prefix)


def to_torch_groupnorm(params: NormParams, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A `torch.nn.GroupNorm` state dict of numpy arrays; see `from_torch_groupnorm`.

    Examples:
      >>> sorted(bnjax.convert.to_torch_groupnorm(bnjax.groupnorm_init(6)))
      ['bias', 'weight']
    """
    return affine_dict(params, "weight", "bias", convert=np.array, prefix=prefix)


def from_torch_rmsnorm(state_dict: Mapping[str, Any], *, prefix: str = "") -> NormParams:
    """`NormParams(scale, None)` from a `torch.nn.RMSNorm` state dict.

    `weight` has the shape `normalized_shape`, as bnjax's RMSNorm scale for
    `axis=(-k, ..., -1)` with `k` the length of `normalized_shape`; it is
    absent for `elementwise_affine=False`. PyTorch's `eps=None` (its default)
    means `torch.finfo(x.dtype).eps`, about 1.2e-7 for float32, where bnjax's
    default is 1e-6: pass `epsilon=module.eps`, or that value, to
    `rmsnorm_apply`. A Transformer Engine `RMSNorm` with
    `zero_centered_gamma=True` stores `weight` as `g`, applied as `1 + g`:
    apply it with `zero_centered_scale=True`.

    Examples:
      >>> params = bnjax.convert.from_torch_rmsnorm({"weight": np.ones(8, np.float32)})
      >>> params.scale.shape, params.bias
      ((8,), None)
    """
    return NormParams(as_jax_or_none(state_dict.get(prefix + "weight")), None)


def to_torch_rmsnorm(params: NormParams, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A `torch.nn.RMSNorm` state dict of numpy arrays; see `from_torch_rmsnorm`.

    Raises:
      ValueError: `params.bias` is not None (`torch.nn.RMSNorm` has no bias).

    Examples:
      >>> sorted(bnjax.convert.to_torch_rmsnorm(bnjax.rmsnorm_init(8)))
      ['weight']
    """
    if params.bias is not None:
        raise ValueError(
            "`params.bias` must be None for `torch.nn.RMSNorm`, which has no bias, "
            f"got an array of shape {np.shape(params.bias)}."
        )
    return affine_dict(params, "weight", "bias", convert=np.array, prefix=prefix)
