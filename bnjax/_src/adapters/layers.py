"""What both framework adapters share: how a layer is made from a factory.

An adapter layer is a factory's `Normalizer` plus the parameters (and, for
the batch normalizers, running statistics) its `init` makes. Neither
adapter computes anything itself: the normalizer's `apply` does all the work.
"""

import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax

from bnjax._src import factories
from bnjax._src.types import BatchStats, Normalizer, NormParams

# A per-example `(scale, shift)`, as every `apply` takes it.
Modulation = tuple[jax.Array | None, jax.Array | None] | None


class Kind(NamedTuple):
    """One normalizer: the factory that binds its keywords, and how a layer is sized."""

    factory: Callable[..., Normalizer]
    # Sized by `feature_shape`, the shape of the normalized axes of each
    # example (LayerNorm, RMSNorm), rather than by the number of features.
    per_example: bool = False


BATCHNORM = Kind(factories.batchnorm)
BATCHRENORM = Kind(factories.batchrenorm)
LAYERNORM = Kind(factories.layernorm, per_example=True)
RMSNORM = Kind(factories.rmsnorm, per_example=True)
GROUPNORM = Kind(factories.groupnorm)
INSTANCENORM = Kind(factories.instancenorm)


class BoundNormalizer:
    """A factory's `Normalizer` that prints as the call that made it.

    The modules keep one as a static attribute, so `print(model)` shows
    e.g. `bnjax.batchnorm(momentum=0.8)`. Two made by the same call compare
    equal, so `nnx.jit` and `eqx.filter_jit` compile a model once for all
    its equally configured copies, as they do for the frameworks' own
    layers (a call with an unhashable keyword falls back to identity).
    """

    __slots__ = ("init", "apply", "_call", "_key")

    def __init__(self, normalizer: Normalizer, call: str, key: Hashable) -> None:
        self.init, self.apply, self._call = normalizer.init, normalizer.apply, call
        try:
            hash(key)
        except TypeError:
            key = object()
        self._key = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BoundNormalizer) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return self._call


class Layer(NamedTuple):
    """A built layer: its bound normalizer, initial parameters and running statistics."""

    normalizer: BoundNormalizer
    params: NormParams
    stats: BatchStats | None


def build(kind: Kind, size: int | Sequence[int], hyper: dict[str, Any]) -> Layer:
    """Binds `hyper` with `kind.factory` and initializes it for features of `size`.

    The factory checks every keyword, and its `init` (given the smallest
    input shape with `size` on the layer's axes) checks them against `size`
    (e.g. `num_groups` must divide the channels), so a bad layer fails
    when it is made.

    Args:
      kind: the normalizer.
      size: the number of features (`num_features`), or for LayerNorm and
        RMSNorm the shape of the normalized axes (`feature_shape`).
      hyper: the factory's keywords; LayerNorm's and RMSNorm's `axis`
        defaults to the last `len(feature_shape)` axes.
    """
    if kind.per_example and "axis" not in hyper:
        hyper = {**hyper, "axis": trailing_axes(size)}
    normalizer = kind.factory(**hyper)
    axis = hyper.get("axis", inspect.signature(kind.factory).parameters["axis"].default)
    params, stats = normalizer.init(smallest_input_shape(size, axis))
    keywords = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
    call = f"bnjax.{kind.factory.__name__}({keywords})"
    key = (kind.factory, tuple(sorted(hyper.items())))
    return Layer(BoundNormalizer(normalizer, call, key), params, stats)


def trailing_axes(feature_shape: int | Sequence[int]) -> int | tuple[int, ...]:
    """The last `len(feature_shape)` axes (-1 for an int)."""
    if isinstance(feature_shape, int):
        return -1
    return tuple(range(-len(feature_shape), 0))


def smallest_input_shape(size: int | Sequence[int], axis: Any) -> tuple[int, ...]:
    """The shape of lowest rank, batch axis included, with `size` on `axis`, ones elsewhere.

    Raises:
      ValueError: `axis` does not name one axis per entry of `size`.
      TypeError: `axis` is not an int or a sequence of ints.
    """
    sizes = (size,) if isinstance(size, int) else tuple(size)
    axes = (axis,) if isinstance(axis, int) else axis
    if not isinstance(axes, Sequence) or not all(isinstance(a, int) for a in axes):
        raise TypeError(f"`axis` must be an int or a tuple of ints, got {axis!r}.")
    if len(axes) != len(sizes):
        raise ValueError(
            f"`axis` must name one axis per entry of the feature shape {sizes}, got {axis!r}."
        )
    rank = max([a + 1 for a in axes if a >= 0] + [1 - a for a in axes if a < 0])
    shape = [1] * rank
    for a, s in zip(sorted(a % rank for a in axes), sizes, strict=True):
        shape[a] = s
    return tuple(shape)


def missing_framework(error: ModuleNotFoundError, adapter: str, extra: str) -> ModuleNotFoundError:
    """The error of importing `bnjax.<adapter>` without its framework: which extra to install."""
    framework = {"flax": "Flax", "equinox": "Equinox"}[extra]
    message = f"`bnjax.{adapter}` needs {framework}: `pip install 'bnjax[{extra}]'`."
    return ModuleNotFoundError(message, name=error.name)
