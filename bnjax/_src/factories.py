"""Factories that bind hyperparameters into `Normalizer(init, apply)` pairs.

Each factory takes the keyword arguments of the matching `*_init` and
`*_apply` functions and returns closures over them, so that every normalizer
has the signature `apply(params, state, x, train, *, mask=None,
modulation=None)`. `zero_centered_scale` is bound into both `init` and
`apply`, so the two always agree. Hyperparameters are checked once, when
the factory is called.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from bnjax._src import checks, output, stats
from bnjax._src.batchnorm import batchnorm_apply, batchnorm_init
from bnjax._src.batchrenorm import batchrenorm_apply
from bnjax._src.groupnorm import groupnorm_apply, groupnorm_init, instancenorm_apply
from bnjax._src.layernorm import layernorm_apply, layernorm_init
from bnjax._src.rmsnorm import rmsnorm_apply, rmsnorm_init
from bnjax._src.types import BatchStats, CollectedStats, Normalizer, NormParams


def batchnorm(
    *,
    axis: int = -1,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
    axis_name: stats.AxisName | None = None,
    virtual_batch_size: int | None = None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
    momentum_warmup: bool = False,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
) -> Normalizer:
    """BatchNorm as a `Normalizer`; see `batchnorm_init` and `batchnorm_apply`.

    Examples:
      >>> norm = bnjax.batchnorm(momentum=0.99)
      >>> params, state = norm.init((8, 4))
      >>> y, state = norm.apply(params, state, jnp.ones((8, 4)), True)
    """
    return _batch_normalizer(
        batchnorm_apply,
        _ParamSpec(use_scale, use_bias, zero_centered_scale, param_dtype),
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,
        virtual_batch_size=virtual_batch_size,
        unbiased_running_var=unbiased_running_var,
        skip_nonfinite=skip_nonfinite,
        momentum_warmup=momentum_warmup,
        dtype=dtype,
    )


def batchrenorm(
    *,
    axis: int = -1,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis_name: stats.AxisName | None = None,
    virtual_batch_size: int | None = None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
    momentum_warmup: bool = False,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
) -> Normalizer:
    """Batch Renormalization as a `Normalizer`; see `batchrenorm_apply`."""
    checks.check_renorm_limits(r_max, d_max)
    return _batch_normalizer(
        batchrenorm_apply,
        _ParamSpec(use_scale, use_bias, zero_centered_scale, param_dtype),
        r_max=r_max,
        d_max=d_max,
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,
        virtual_batch_size=virtual_batch_size,
        unbiased_running_var=unbiased_running_var,
        skip_nonfinite=skip_nonfinite,
        momentum_warmup=momentum_warmup,
        dtype=dtype,
    )


def layernorm(
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
) -> Normalizer:
    """LayerNorm as a stateless `Normalizer`; see `layernorm_apply`.

    `init(input_shape)` creates parameters of the normalized axes' shape.
    """
    checks.check_epsilon(epsilon)
    spec = _ParamSpec(use_scale, use_bias, zero_centered_scale, param_dtype)

    def init(input_shape: Sequence[int]) -> NormParams:
        axes = checks.normalize_axes(axis, len(input_shape))
        feature_shape = tuple(input_shape[a] for a in axes)
        return layernorm_init(feature_shape, **spec._asdict())

    hyper = dict(axis=axis, epsilon=epsilon, zero_centered_scale=zero_centered_scale)
    return _stateless(init, layernorm_apply, hyper, dtype)


def rmsnorm(
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-6,
    use_scale: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
) -> Normalizer:
    """RMSNorm as a stateless `Normalizer`; see `rmsnorm_apply`.

    Example (Gemma's RMSNorm: the scale stored as `g`, applied as `1 + g`):
      >>> norm = bnjax.rmsnorm(zero_centered_scale=True)
      >>> params, _ = norm.init((2, 8))
      >>> params.scale[:3]
      Array([0., 0., 0.], dtype=float32)
    """
    checks.check_epsilon(epsilon)

    def init(input_shape: Sequence[int]) -> NormParams:
        axes = checks.normalize_axes(axis, len(input_shape))
        feature_shape = tuple(input_shape[a] for a in axes)
        return rmsnorm_init(
            feature_shape,
            use_scale=use_scale,
            zero_centered_scale=zero_centered_scale,
            param_dtype=param_dtype,
        )

    hyper = dict(axis=axis, epsilon=epsilon, zero_centered_scale=zero_centered_scale)
    return _stateless(init, rmsnorm_apply, hyper, dtype)


def groupnorm(
    *,
    num_groups: int = 32,
    axis: int = -1,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
) -> Normalizer:
    """GroupNorm as a stateless `Normalizer`; see `groupnorm_apply`."""
    checks.check_size("num_groups", num_groups)
    checks.check_epsilon(epsilon)
    spec = _ParamSpec(use_scale, use_bias, zero_centered_scale, param_dtype)

    def init(input_shape: Sequence[int]) -> NormParams:
        num_channels = input_shape[checks.check_channel_axis(axis, len(input_shape))]
        checks.check_num_groups(num_groups, num_channels)
        return groupnorm_init(num_channels, **spec._asdict())

    hyper = dict(
        num_groups=num_groups, axis=axis, epsilon=epsilon, zero_centered_scale=zero_centered_scale
    )
    return _stateless(init, groupnorm_apply, hyper, dtype)


def instancenorm(
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    zero_centered_scale: bool = False,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
) -> Normalizer:
    """InstanceNorm as a stateless `Normalizer`; see `instancenorm_apply`."""
    checks.check_epsilon(epsilon)
    spec = _ParamSpec(use_scale, use_bias, zero_centered_scale, param_dtype)

    def init(input_shape: Sequence[int]) -> NormParams:
        num_channels = input_shape[checks.check_channel_axis(axis, len(input_shape))]
        return groupnorm_init(num_channels, **spec._asdict())

    hyper = dict(axis=axis, epsilon=epsilon, zero_centered_scale=zero_centered_scale)
    return _stateless(init, instancenorm_apply, hyper, dtype)


class _ParamSpec(NamedTuple):
    """How `init` creates the affine parameters (the keywords of every `*_init`)."""

    use_scale: bool
    use_bias: bool
    zero_centered_scale: bool
    param_dtype: DTypeLike


def _batch_normalizer(
    apply_fn: Callable[..., tuple[jax.Array, Any]], spec: _ParamSpec, **hyper: Any
) -> Normalizer:
    """BatchNorm-like: `batchnorm_init`'s params and state, `apply_fn` bound to `hyper`."""
    checks.check_momentum(hyper["momentum"])
    checks.check_momentum_warmup(hyper["momentum"], hyper["momentum_warmup"])
    checks.check_epsilon(hyper["epsilon"])
    checks.check_output_dtype(hyper["dtype"], jnp.float32)

    def init(input_shape: Sequence[int]) -> tuple[NormParams, Any]:
        axis = checks.check_feature_axis(hyper["axis"], len(input_shape))
        return batchnorm_init(input_shape[axis], **spec._asdict())

    def apply(
        params: NormParams,
        state: BatchStats | CollectedStats,
        x: jax.Array,
        train: bool,
        *,
        mask: jax.Array | None = None,
        modulation: output.Modulation | None = None,
    ) -> tuple[jax.Array, BatchStats | CollectedStats]:
        return apply_fn(
            params,
            state,
            x,
            train,
            mask=mask,
            modulation=modulation,
            zero_centered_scale=spec.zero_centered_scale,
            **hyper,
        )

    return Normalizer(init, apply)


def _stateless(
    init_params: Callable[[Sequence[int]], NormParams],
    apply_fn: Callable[..., jax.Array],
    hyper: dict[str, Any],
    dtype: DTypeLike | None,
) -> Normalizer:
    """Wraps a normalizer without running state: `state` is `None` throughout."""
    checks.check_output_dtype(dtype, jnp.float32)

    def init(input_shape: Sequence[int]) -> tuple[NormParams, None]:
        return init_params(input_shape), None

    def apply(
        params: NormParams,
        state: None,
        x: jax.Array,
        train: bool,
        *,
        mask: jax.Array | None = None,
        modulation: output.Modulation | None = None,
    ) -> tuple[jax.Array, None]:
        checks.check_train(train)
        return apply_fn(params, x, mask=mask, modulation=modulation, dtype=dtype, **hyper), state

    return Normalizer(init, apply)
