"""bnjax's normalizers as Equinox modules (`bnjax.equinox`).

Equinox layers see one example at a time; a model is mapped over the batch
with `jax.vmap`. Each layer here gives its example a batch axis of size one
and calls the factory's `apply`, which pools the statistics across the
`jax.vmap` axis named by `axis_name`, so a mapped BatchNorm computes exactly
what `bnjax.batchnorm_apply` computes on the whole batch. Axes count within
one example: `axis=0` is the channel axis of an Equinox conv's `(C, H, W)`
output, the default of the layers with a feature axis.
"""

from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

from bnjax._src.adapters import layers

try:
    import equinox as eqx
except ModuleNotFoundError as error:  # the core needs neither framework
    raise layers.missing_framework(error, "equinox", "equinox") from error
import jax

from bnjax._src.adapters.layers import Modulation
from bnjax._src.types import BatchStats, CollectedStats, NormParams


class _Normalization(eqx.Module):
    """The parameters as `NormParams` and the bound `Normalizer`."""

    params: NormParams
    normalizer: layers.BoundNormalizer = eqx.field(static=True)

    def _normalize(
        self,
        x: jax.Array,
        state: BatchStats | CollectedStats | None,
        train: bool,
        mask: jax.Array | None,
        modulation: Modulation,
    ) -> tuple[jax.Array, Any]:
        """Applies the normalizer to `x` as a batch of one example."""
        y, new_state = self.normalizer.apply(
            self.params,
            state,
            x[None],
            train,
            mask=None if mask is None else mask[None],
            modulation=None if modulation is None else _batched_modulation(modulation),
        )
        return y[0], new_state


class _StatelessNormalization(_Normalization):
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        modulation: Modulation = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes one example `x`.

        Args:
          x: one example (no batch axis).
          mask: optional boolean mask of the entries of `x` that count, by
            bnjax's mask rule applied to this example.
          modulation: optional `(scale, shift)` for this example, of `x`'s rank.
          key: unused; accepted as Equinox layers take it.

        Returns:
          `y` of `x`'s shape, in the layer's `dtype` (default `x`'s).
        """
        return self._normalize(x, None, True, mask, modulation)[0]


class _BatchNormalization(_Normalization, eqx.nn.StatefulLayer):
    state_index: eqx.nn.StateIndex[BatchStats]
    inference: bool

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        mask: jax.Array | None = None,
        modulation: Modulation = None,
        inference: bool | None = None,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes one example `x` with the batch's statistics (training) or the running ones.

        Call it inside `jax.vmap(..., axis_name=...)` with the layer's
        `axis_name`: the batch statistics are those of every example of the
        mapped batch.

        Args:
          x: one example (no batch axis), features on the layer's `axis`.
          state: the model's `eqx.nn.State`.
          mask: optional boolean mask of the entries of `x` that count; a
            mask of shape `()` says whether the example counts at all.
          modulation: optional `(scale, shift)` for this example, of `x`'s rank.
          inference: eval mode when True, training when False; `None` takes
            the field `self.inference`, which `eqx.nn.inference_mode` sets.
          key: unused; accepted as Equinox layers take it.

        Returns:
          `(y, state)`: `y` of `x`'s shape and the state with this layer's
          new running statistics (unchanged in eval mode).
        """
        if inference is None:
            inference = self.inference
        y, new_stats = self._normalize(
            x, state.get(self.state_index), not inference, mask, modulation
        )
        if inference:  # `state.set` would retire `state`, which stays valid in eval mode
            return y, state
        return y, state.set(self.state_index, new_stats)

    _kind: ClassVar[layers.Kind]

    def __init__(
        self,
        num_features: int,
        *,
        axis_name: Hashable | tuple[Hashable, ...],
        axis: int = 0,
        inference: bool = False,
        **hyper: Any,
    ) -> None:
        """Creates the parameters and the running statistics' `eqx.nn.StateIndex`.

        Args:
          num_features: the size `C` of the feature axis.
          axis_name: the name of the `jax.vmap` (or `shard_map`/`pmap`) axis
            the model is mapped over, or a tuple of names; the batch
            statistics pool every example of those axes.
          axis: the feature axis of one example. Default 0, the channels of
            an Equinox conv's `(C, *spatial)` output.
          inference: start in eval mode. Default False.
          **hyper: the other keywords of the matching factory
            (`bnjax.batchnorm`, `bnjax.batchrenorm`): `momentum` (`running =
            momentum * running + (1 - momentum) * batch`, default 0.9),
            `epsilon`, `virtual_batch_size`, `momentum_warmup`, ...
        """
        hyper = {**hyper, "axis": _batched_axis(axis), "axis_name": axis_name}
        layer = layers.build(self._kind, num_features, hyper)
        assert layer.stats is not None  # the batch normalizers' `init` makes `BatchStats`
        self.params, self.normalizer = layer.params, layer.normalizer
        self.state_index = eqx.nn.StateIndex(layer.stats)
        self.inference = inference


class BatchNorm(_BatchNormalization):
    """BatchNorm for Equinox models; the numbers of `bnjax.batchnorm_apply` on the whole batch.

    `BatchNorm(num_features, *, axis_name, axis=0, inference=False, **hyper)`,
    `hyper` the other keywords of `bnjax.batchnorm`.

    Examples:
      >>> import equinox as eqx
      >>> from bnjax import equinox as beqx
      >>> bn, state = eqx.nn.make_with_state(beqx.BatchNorm)(3, axis_name="batch")
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> y, state = jax.vmap(bn, (0, None), (0, None), axis_name="batch")(x, state)
      >>> state.get(bn.state_index).count
      Array(1, dtype=int32)
    """

    _kind: ClassVar[layers.Kind] = layers.BATCHNORM


class BatchRenorm(_BatchNormalization):
    """Batch Renormalization for Equinox models; the numbers of `bnjax.batchrenorm_apply`.

    `BatchRenorm(num_features, *, axis_name, axis=0, inference=False,
    **hyper)`, `hyper` the other keywords of `bnjax.batchrenorm` (`r_max`, `d_max`, ...).
    """

    _kind: ClassVar[layers.Kind] = layers.BATCHRENORM


class LayerNorm(_StatelessNormalization):
    """LayerNorm for Equinox models; the numbers of `bnjax.layernorm_apply`.

    Examples:
      >>> from bnjax import equinox as beqx
      >>> beqx.LayerNorm(8)(jnp.ones(8)).shape
      (8,)
    """

    def __init__(self, feature_shape: int | Sequence[int], **hyper: Any) -> None:
        """Creates `scale` and `bias` of shape `feature_shape`.

        Args:
          feature_shape: the shape of the normalized axes of one example.
          **hyper: the keywords of `bnjax.layernorm`; `axis` (of one
            example) defaults to the last `len(feature_shape)` axes.
        """
        _build_stateless(self, layers.LAYERNORM, feature_shape, hyper)


class RMSNorm(_StatelessNormalization):
    """RMSNorm for Equinox models; the numbers of `bnjax.rmsnorm_apply` (`bias` is None)."""

    def __init__(self, feature_shape: int | Sequence[int], **hyper: Any) -> None:
        """As `LayerNorm`; `**hyper` are the keywords of `bnjax.rmsnorm`."""
        _build_stateless(self, layers.RMSNORM, feature_shape, hyper)


class GroupNorm(_StatelessNormalization):
    """GroupNorm for Equinox models; the numbers of `bnjax.groupnorm_apply`."""

    def __init__(self, num_features: int, *, axis: int = 0, **hyper: Any) -> None:
        """Creates `scale` and `bias` of shape `(num_features,)`.

        Args:
          num_features: the size `C` of the feature axis.
          axis: the feature axis of one example. Default 0 (`(C, *spatial)`).
          **hyper: the other keywords of `bnjax.groupnorm`: `num_groups`
            (default 32, must divide `num_features`), `epsilon`, ...
        """
        _build_stateless(self, layers.GROUPNORM, num_features, {**hyper, "axis": axis})


class InstanceNorm(_StatelessNormalization):
    """InstanceNorm for Equinox models; the numbers of `bnjax.instancenorm_apply`."""

    def __init__(self, num_features: int, *, axis: int = 0, **hyper: Any) -> None:
        """As `GroupNorm`; `**hyper` are the keywords of `bnjax.instancenorm`."""
        _build_stateless(self, layers.INSTANCENORM, num_features, {**hyper, "axis": axis})


def _build_stateless(
    module: _Normalization, kind: layers.Kind, size: int | Sequence[int], hyper: dict[str, Any]
) -> None:
    if kind.per_example and "axis" not in hyper:
        hyper = {**hyper, "axis": layers.trailing_axes(size)}
    layer = layers.build(kind, size, {**hyper, "axis": _batched_axis(hyper["axis"])})
    module.params, module.normalizer = layer.params, layer.normalizer


def _batched_axis(axis: Any) -> Any:
    """An example's axis (or axes) as an axis of the batch of one made from it."""
    if isinstance(axis, int):
        return axis + 1 if axis >= 0 else axis
    if isinstance(axis, Sequence):
        return tuple(_batched_axis(a) for a in axis)
    return axis  # not an axis: the factory says so


def _batched_modulation(modulation: Any) -> Any:
    if not isinstance(modulation, tuple):
        return modulation  # not a pair: the normalizer says so
    return tuple(None if part is None else part[None] for part in modulation)
