"""Helpers shared by the converters: array conversion and affine dicts."""

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src.types import NormParams

T = TypeVar("T")


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array of `value`, also from a torch tensor (detached, on the CPU).

    A bfloat16 tensor, which torch cannot hand to numpy, comes out as
    numpy arrays of `jnp.bfloat16`, bit for bit.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            torch = sys.modules[type(value).__module__.split(".")[0]]
            return np.asarray(value.view(torch.int16).numpy()).view(jnp.bfloat16)
        value = value.numpy()
    return np.asarray(value)


def as_jax(value: Any) -> jax.Array:
    """A JAX array of `value` (see `as_numpy`)."""
    return jnp.asarray(as_numpy(value))


def as_jax_or_none(value: Any) -> jax.Array | None:
    """`as_jax(value)`, for an optional value: None stays None."""
    return None if value is None else as_jax(value)


def affine_dict(
    params: NormParams,
    scale_key: str,
    bias_key: str,
    *,
    convert: Callable[[jax.Array], T],
    prefix: str = "",
) -> dict[str, T]:
    """`{prefix + scale_key: convert(scale), prefix + bias_key: convert(bias)}`.

    A parameter that is None is left out, so the dict may be empty.
    """
    out = {}
    for key, value in ((scale_key, params.scale), (bias_key, params.bias)):
        if value is not None:
            out[prefix + key] = convert(value)
    return out
