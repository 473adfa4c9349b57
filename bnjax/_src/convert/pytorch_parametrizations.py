"""Converters for PyTorch's `weight_norm` and `spectral_norm` parametrizations.

A module parametrized with `torch.nn.utils.parametrizations.weight_norm`
stores `parametrizations.weight.original0` (`g`, of shape `(out, 1, ...)`)
and `parametrizations.weight.original1` (`v`); one parametrized with
`spectral_norm` stores `parametrizations.weight.original` (the raw kernel)
and the buffers `parametrizations.weight.0._u` and `._v`. These converters
cover `Linear` and `ConvNd` weights, `(out, in, *spatial)`, with the
parametrization's default `dim=0`; bnjax's kernels are `(*spatial, in, out)`
with `axis=-1`, so kernels (and spectral norm's `v`) are transposed, which
is exact. `u` keeps its layout.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src.convert._common import as_numpy
from bnjax._src.types import NormParams, SpectralState


def from_torch_weightnorm(
    state_dict: Mapping[str, Any], *, prefix: str = "", name: str = "weight"
) -> tuple[jax.Array, NormParams]:
    """`(v, params)` for `weightnorm_apply` from a module parametrized with `weight_norm`.

    Args:
      state_dict: `module.state_dict()`, or a whole model's with `prefix`.
      prefix: prepended to every key, e.g. `"layer1."`. Default "".
      name: the parametrized tensor. Default "weight".

    Returns:
      `(v, NormParams(scale, None))`: the direction in bnjax's layout
      (`(in, out)` for Linear, `(*spatial, in, out)` for ConvNd) and the
      scale `g` flattened to `(out,)`, JAX arrays of the stored dtype.

    Raises:
      ValueError: a key is missing, or `g` does not hold one value per
        output.

    Examples:
      >>> sd = {"parametrizations.weight.original0": np.full((4, 1), 2.0),
      ...       "parametrizations.weight.original1": np.ones((4, 3))}
      >>> v, params = bnjax.convert.from_torch_weightnorm(sd)
      >>> v.shape, params.scale.shape
      ((3, 4), (4,))
    """
    base = f"{prefix}parametrizations.{name}."
    g, v = (_get(state_dict, base + key) for key in ("original0", "original1"))
    if g.size != v.shape[0]:
        raise ValueError(
            f"`{base}original0` must hold one value per output ({v.shape[0]}, axis 0 of "
            f"`original1`), got shape {g.shape}. Only `dim=0` is supported."
        )
    return jnp.asarray(_to_bnjax_layout(v)), NormParams(jnp.asarray(g.reshape(-1)), None)


def to_torch_weightnorm(
    v: jax.Array, params: NormParams, *, prefix: str = "", name: str = "weight"
) -> dict[str, np.ndarray]:
    """A `weight_norm`-parametrized module's state dict; see `from_torch_weightnorm`.

    Load it with `module.load_state_dict({k: torch.from_numpy(x) for k, x
    in d.items()}, strict=False)` (strict if the module has no other
    tensors, such as a bias).

    Examples:
      >>> v = jnp.ones((3, 3, 2, 8))
      >>> sd = bnjax.convert.to_torch_weightnorm(v, bnjax.weightnorm_init(v))
      >>> [x.shape for x in sd.values()]
      [(8, 1, 1, 1), (8, 2, 3, 3)]
    """
    torch_v = _to_torch_layout(as_numpy(v))
    g = as_numpy(params.scale).reshape((-1,) + (1,) * (torch_v.ndim - 1))
    base = f"{prefix}parametrizations.{name}."
    return {base + "original0": np.array(g), base + "original1": torch_v}


def from_torch_spectralnorm(
    state_dict: Mapping[str, Any], *, prefix: str = "", name: str = "weight"
) -> tuple[jax.Array, SpectralState]:
    """`(kernel, state)` for `spectralnorm_apply` from a module parametrized with `spectral_norm`.

    `_v` runs over PyTorch's `(in, *spatial)` order and is reordered to
    bnjax's `(*spatial, in)`. PyTorch's `n_power_iterations` and `eps` are
    `spectralnorm_apply`'s `num_iterations` and `epsilon`.

    Args:
      state_dict: `module.state_dict()`, or a whole model's with `prefix`.
      prefix: prepended to every key. Default "".
      name: the parametrized tensor. Default "weight".

    Returns:
      `(kernel, SpectralState(u, v))`: the raw kernel in bnjax's layout and
      the power iteration's vectors, JAX arrays of the stored dtype.

    Raises:
      ValueError: a key is missing.

    Examples:
      >>> sd = {"parametrizations.weight.original": np.ones((4, 2, 3, 3)),
      ...       "parametrizations.weight.0._u": np.ones(4) / 2,
      ...       "parametrizations.weight.0._v": np.ones(18) / np.sqrt(18)}
      >>> kernel, state = bnjax.convert.from_torch_spectralnorm(sd)
      >>> kernel.shape, state.v.shape
      ((3, 3, 2, 4), (18,))
    """
    base = f"{prefix}parametrizations.{name}."
    weight, u, v = (_get(state_dict, base + key) for key in ("original", "0._u", "0._v"))
    rest = np.moveaxis(v.reshape(weight.shape[1:]), 0, -1)  # (in, *spatial) -> (*spatial, in)
    state = SpectralState(jnp.asarray(u), jnp.asarray(rest.reshape(-1)))
    return jnp.asarray(_to_bnjax_layout(weight)), state


def to_torch_spectralnorm(
    kernel: jax.Array, state: SpectralState, *, prefix: str = "", name: str = "weight"
) -> dict[str, np.ndarray]:
    """A `spectral_norm`-parametrized module's state dict; see `from_torch_spectralnorm`.

    Examples:
      >>> kernel = jnp.ones((3, 3, 2, 4))
      >>> state = bnjax.spectralnorm_init(kernel.shape, jax.random.key(0))
      >>> sd = bnjax.convert.to_torch_spectralnorm(kernel, state)
      >>> [(k.split(".", 2)[-1], x.shape) for k, x in sd.items()]
      [('original', (4, 2, 3, 3)), ('0._u', (4,)), ('0._v', (18,))]
    """
    numpy_kernel = as_numpy(kernel)
    rest = np.moveaxis(as_numpy(state.v).reshape(numpy_kernel.shape[:-1]), -1, 0)
    base = f"{prefix}parametrizations.{name}."
    return {
        base + "original": _to_torch_layout(numpy_kernel),
        base + "0._u": np.array(state.u),
        base + "0._v": np.array(rest).reshape(-1),
    }


def _get(state_dict: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in state_dict:
        raise ValueError(f"`state_dict` must hold `{key}`, got keys {sorted(state_dict)}.")
    return as_numpy(state_dict[key])


def _to_bnjax_layout(weight: np.ndarray) -> np.ndarray:
    """PyTorch's `(out, in, *spatial)` as bnjax's `(*spatial, in, out)`."""
    return np.array(np.transpose(weight, (*range(2, weight.ndim), 1, 0)), order="C")


def _to_torch_layout(kernel: np.ndarray) -> np.ndarray:
    """bnjax's `(*spatial, in, out)` as PyTorch's `(out, in, *spatial)`."""
    ndim = kernel.ndim
    return np.array(np.transpose(kernel, (ndim - 1, ndim - 2, *range(ndim - 2))), order="C")
