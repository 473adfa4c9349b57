"""Argument checks, run at trace time.

Every message has the form "`arg` must be X, got Y" and names the fix where
there is one. Checks read only static information (shapes, dtypes, Python
numbers), so they cost nothing inside a compiled function.
"""

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_train(train: Any) -> None:
    """`train` selects a code path at trace time, so it must be a Python bool."""
    if isinstance(train, jax.core.Tracer):
        raise TypeError(
            "`train` must be a Python bool, got a traced value "
            f"({train.aval}). Mark it static, e.g. "
            "`jax.jit(f, static_argnames='train')`, or close over it."
        )
    if not isinstance(train, bool | np.bool_):
        raise TypeError(f"`train` must be a Python bool, got {train!r}.")


def check_floating(x: jax.Array, name: str = "x") -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating dtype, got {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def normalize_axes(
    axis: int | np.integer[Any] | Sequence[int], ndim: int, name: str = "axis"
) -> tuple[int, ...]:
    """Turns `axis` (an int or a sequence of ints) into sorted non-negative axes."""
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    if not axes:
        raise ValueError(f"`{name}` must name at least one axis, got {axis!r}.")
    result = []
    for a in axes:
        if not isinstance(a, int | np.integer):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}` must be in [{-ndim}, {ndim}) for an input of rank {ndim}, got {a}."
            )
        result.append(int(a) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"`{name}` must not repeat an axis, got {axis!r}.")
    return tuple(sorted(result))


def check_feature_axis(axis: Any, ndim: int) -> int:
    """The one feature axis of BatchNorm-like normalizers, as a non-negative int."""
    if not isinstance(axis, int | np.integer):
        raise TypeError(f"`axis` must be a single int (the feature axis), got {axis!r}.")
    return normalize_axes(axis, ndim)[0]


def check_kernel(w: jax.Array, axis: Any, *, name: str, min_rank: int = 1) -> int:
    """A kernel for a weight normalization: floating, rank >= `min_rank`; returns its output axis.

    `axis` is the one output axis (the last for `(in, out)` Dense and
    `HWIO` Conv kernels).
    """
    check_floating(w, name)
    return check_kernel_shape(tuple(jnp.shape(w)), axis, name=name, min_rank=min_rank)


def check_kernel_shape(shape: tuple[int, ...], axis: Any, *, name: str, min_rank: int = 1) -> int:
    """The shape part of `check_kernel`; returns the output axis, non-negative."""
    if len(shape) < min_rank:
        axes = "an output axis and at least one other" if min_rank > 1 else "an output axis"
        raise ValueError(f"`{name}` must have rank >= {min_rank} ({axes}), got shape {shape}.")
    if not isinstance(axis, int | np.integer):
        raise TypeError(f"`axis` must be a single int (the output axis), got {axis!r}.")
    return normalize_axes(axis, len(shape))[0]


def check_param_shape(
    name: str, value: jax.Array | None, expected: tuple[int, ...], what: str
) -> None:
    """`value` (a parameter or a running statistic) must have shape `expected`."""
    if value is not None and tuple(jnp.shape(value)) != expected:
        raise ValueError(
            f"`{name}` must have shape {expected} to match {what}, got {tuple(jnp.shape(value))}."
        )


def check_momentum(momentum: float | None) -> None:
    if momentum is None or isinstance(momentum, jax.core.Tracer):
        return
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"`momentum` must be in [0, 1] or None, got {momentum}.")


def check_epsilon(epsilon: float) -> None:
    if isinstance(epsilon, jax.core.Tracer):
        return
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon}.")


def broadcast_mask(
    mask: jax.typing.ArrayLike, x_shape: tuple[int, ...], feature_axis: int | None
) -> jax.Array:
    """Checks a boolean mask against `x_shape` by the one mask rule; returns it at `x`'s rank.

    A mask of `x`'s rank broadcasts by numpy's rules (each axis 1 or `x`'s
    size). A mask of lower rank is aligned with `x`'s leading axes and
    broadcast over the rest: `(N,)` masks the examples of `(N, C)` or
    `(N, H, W, C)`, `(N, T)` the tokens of `(N, T, C)`. With a
    `feature_axis`, the mask must not vary along it: size 1 there, and a
    lower-rank mask must stop before it.

    Returns:
      A boolean array of rank `len(x_shape)`, each axis of size 1 or of
      `x`'s size (size 1 on the feature axis, if any).
    """
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"`mask` must be boolean, got dtype {mask.dtype}. Use e.g. `mask.astype(bool)`."
        )
    ndim = len(x_shape)
    if mask.ndim > ndim:
        raise ValueError(
            f"`mask` must have at most the rank of `x` (shape {x_shape}), got shape {mask.shape}."
        )
    if feature_axis is not None and mask.ndim < ndim and mask.ndim > feature_axis:
        example = tuple(1 if a == feature_axis else n for a, n in enumerate(x_shape))
        raise ValueError(
            f"`mask` with fewer axes than `x` is aligned with its leading axes and must not "
            f"reach the feature axis {feature_axis}: got shape {mask.shape} for `x` of shape "
            f"{x_shape}. Give the mask `x`'s rank, with size 1 on the feature axis, "
            f"e.g. {example}."
        )
    padded = mask.shape + (1,) * (ndim - mask.ndim)
    fits = all(m in (1, n) for m, n in zip(padded, x_shape, strict=True))
    if not fits or (feature_axis is not None and padded[feature_axis] != 1):
        rule = " and have size 1 on the feature axis" if feature_axis is not None else ""
        raise ValueError(
            f"`mask` must broadcast to `x`'s shape {x_shape} (a lower-rank mask aligned with "
            f"the leading axes){rule}, got shape {mask.shape}."
        )
    return mask.reshape(padded)


def mapped_axis_size(axis_name: Hashable | tuple[Hashable, ...] | None) -> int:
    """Number of devices (or vmapped instances) along `axis_name`; 1 for None."""
    if axis_name is None:
        return 1
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"`axis_name` must name an axis bound by an enclosing `shard_map`, "
            f"`vmap(..., axis_name=...)` or `pmap`, got {axis_name!r}, which is not bound."
        ) from e


def check_values_per_feature(count: int, x_shape: tuple[int, ...], axis_name: Any) -> None:
    """Training statistics need more than one value per feature, as in PyTorch."""
    if count <= 1:
        where = f" across `axis_name={axis_name!r}`" if axis_name is not None else ""
        raise ValueError(
            f"`x` must have more than one value per feature in training mode{where}, "
            f"got shape {x_shape}. Use a larger batch, or `train=False`."
        )


def check_size(name: str, value: Any) -> None:
    """A layer size: a positive int."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_virtual_batch_size(size: Any, x_shape: tuple[int, ...], feature_axis: int) -> None:
    """Ghost batches split axis 0, the batch axis, into equal groups."""
    check_size("virtual_batch_size", size)
    if feature_axis == 0:
        raise ValueError(
            "`virtual_batch_size` splits axis 0 into groups, so `axis` must not be 0, got 0."
        )
    if x_shape[0] % size:
        raise ValueError(
            f"`virtual_batch_size` must divide the batch size {x_shape[0]}, got {size}."
        )


def check_renorm_limits(r_max: float, d_max: float) -> None:
    if not isinstance(r_max, jax.core.Tracer) and not r_max >= 1:
        raise ValueError(f"`r_max` must be >= 1, got {r_max}.")
    if not isinstance(d_max, jax.core.Tracer) and not d_max >= 0:
        raise ValueError(f"`d_max` must be >= 0, got {d_max}.")


def check_channel_axis(axis: Any, ndim: int) -> int:
    """The channel axis of per-example normalizers: any axis but the batch axis 0."""
    if ndim < 2:
        raise ValueError(
            f"`x` must have a batch axis and a channel axis (rank >= 2), got rank {ndim}."
        )
    channel_axis = check_feature_axis(axis, ndim)
    if channel_axis == 0:
        raise ValueError(f"`axis` must not be the batch axis 0, got {axis}.")
    return channel_axis


def check_num_groups(num_groups: Any, num_channels: int) -> None:
    check_size("num_groups", num_groups)
    if num_channels % num_groups:
        raise ValueError(
            f"`num_groups` must divide the number of channels {num_channels}, got {num_groups}."
        )


def check_modulation(
    modulation: Any, x_shape: tuple[int, ...], channel_axis: int
) -> tuple[jax.Array | None, jax.Array | None] | None:
    """`modulation=(scale, shift)`: per-example arrays of `x`'s rank that broadcast to it.

    `channel_axis` only shapes the example in the message (`(N, 1, C)` for
    tokens with channels last). Returns the pair as JAX arrays (or None).
    """
    if modulation is None:
        return None
    if not isinstance(modulation, tuple | list) or len(modulation) != 2:
        raise TypeError(
            "`modulation` must be a pair `(scale, shift)` (either may be None), "
            f"got {type(modulation).__name__}"
            f"{f' of length {len(modulation)}' if isinstance(modulation, tuple | list) else ''}."
        )
    ndim = len(x_shape)
    example = tuple(n if a in (0, channel_axis) else 1 for a, n in enumerate(x_shape))
    checked: list[jax.Array | None] = []
    for index, part in enumerate(modulation):
        if part is None:
            checked.append(None)
            continue
        name = f"modulation[{index}]"
        part = jnp.asarray(part)
        check_floating(part, name)
        fits = part.ndim == ndim and all(
            m in (1, n) for m, n in zip(part.shape, x_shape, strict=True)
        )
        if not fits:
            hint = f", e.g. `{name}.reshape{example}`" if part.size == math.prod(example) else ""
            raise ValueError(
                f"`{name}` ({('scale', 'shift')[index]}) must have `x`'s rank {ndim} and each "
                f"axis 1 or `x`'s size (`x` has shape {x_shape}), got shape {part.shape}. A "
                f"per-example modulation of `x`'s channels has shape {example}{hint}."
            )
        checked.append(part)
    return checked[0], checked[1]


def check_output_dtype(dtype: jax.typing.DTypeLike | None, x_dtype: jnp.dtype) -> jnp.dtype:
    """`dtype=`: the output dtype, a floating dtype; None means `x`'s."""
    if dtype is None:
        return jnp.dtype(x_dtype)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"`dtype` must be a floating dtype or None, got {dtype!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`dtype` must be a floating dtype or None, got {dtype}. "
            "The output of a normalizer is floating, e.g. `dtype=jnp.bfloat16`."
        )
    return dtype


def check_momentum_warmup(momentum: Any, momentum_warmup: bool) -> None:
    """The warm-up's length, `1 / (1 - momentum)` updates, is fixed at trace time."""
    if momentum_warmup and isinstance(momentum, jax.core.Tracer):
        raise TypeError(
            "`momentum` must be a Python number with `momentum_warmup=True` (the "
            f"warm-up lasts `1 / (1 - momentum)` updates), got a traced value ({momentum.aval}). "
            "Close over it, or mark it static."
        )
