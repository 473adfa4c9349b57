"""bnjax's normalizers as Flax NNX modules (`bnjax.nnx`).

Each module holds a factory's `Normalizer` and its arrays as NNX variables:
`nnx.Param`s `scale` and `bias`, and for the batch normalizers
`nnx.BatchStat`s `mean`, `var` and `count`. A call reads them into
`NormParams`/`BatchStats`, runs the normalizer's `apply` and writes the new
running statistics back, so the numbers are the functions' numbers, bit for
bit.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import jax

from bnjax._src.adapters import layers

try:
    from flax import nnx
except ModuleNotFoundError as error:  # the core needs neither framework
    raise layers.missing_framework(error, "nnx", "flax") from error

from bnjax._src import precise
from bnjax._src.adapters.layers import Modulation
from bnjax._src.types import BatchStats, CollectedStats, NormParams


class _Normalization(nnx.Module):
    """The body every adapter shares: variables in, `apply`, variables out."""

    def _build(
        self, kind: layers.Kind, size: int | Sequence[int], hyper: dict[str, Any]
    ) -> layers.Layer:
        layer = layers.build(kind, size, hyper)
        self.normalizer = layer.normalizer
        self.scale = _param(layer.params.scale)
        self.bias = _param(layer.params.bias)
        return layer

    @property
    def params(self) -> NormParams:
        """The learned affine parameters as `NormParams` (fields `None` when switched off)."""
        return NormParams(_value(self.scale), _value(self.bias))

    def load_params(self, params: NormParams) -> None:
        """Sets `scale` and `bias` from `params`, e.g. from a `bnjax.convert` function.

        Raises:
          ValueError: a field's shape or dtype differs from this layer's, or a
            field is `None` where this layer has one (or the other way round).
        """
        _assign("scale", self.scale, params.scale)
        _assign("bias", self.bias, params.bias)


class _StatelessNormalization(_Normalization):
    def __call__(
        self, x: jax.Array, *, mask: jax.Array | None = None, modulation: Modulation = None
    ) -> jax.Array:
        """Normalizes `x`; see the matching `*_apply` for shapes and `mask`.

        Args:
          x: the input, batch axis first.
          mask: optional boolean mask of the entries that count, by bnjax's mask rule.
          modulation: optional per-example `(scale, shift)` of `x`'s rank.

        Returns:
          `y`, of `x`'s shape, in the layer's `dtype` (default `x`'s).
        """
        y, _ = self.normalizer.apply(self.params, None, x, True, mask=mask, modulation=modulation)
        return y


class _BatchNormalization(_Normalization):
    _kind: ClassVar[layers.Kind]

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        rngs: nnx.Rngs | None = None,
        **hyper: Any,
    ) -> None:
        """Creates the variables: `scale`, `bias` (`nnx.Param`), `mean`, `var`, `count`.

        Args:
          num_features: the size `C` of the feature axis.
          use_running_average: start in eval mode. Default False (training).
          rngs: unused (the initial values are fixed); accepted as NNX layers take it.
          **hyper: the keywords of the matching factory (`bnjax.batchnorm`,
            `bnjax.batchrenorm`): `axis` (default -1), `momentum`
            (`running = momentum * running + (1 - momentum) * batch`,
            default 0.9), `epsilon`, `axis_name`, `virtual_batch_size`,
            `momentum_warmup`, `skip_nonfinite`, `unbiased_running_var`,
            `use_scale`, `use_bias`, `zero_centered_scale`, `param_dtype`,
            `dtype`, and Batch Renorm's `r_max`, `d_max`.
        """
        stats = self._build(self._kind, num_features, hyper).stats
        assert stats is not None
        self.mean = nnx.BatchStat(stats.mean)
        self.var = nnx.BatchStat(stats.var)
        self.count = nnx.BatchStat(stats.count)
        # Set only on the copy `precise_batch_stats` traces: a layer holding
        # a `CollectedStats` here pools its training-mode batches into it.
        self.collected: nnx.Variable[CollectedStats] | None = nnx.data(None)
        self.use_running_average = use_running_average

    @property
    def stats(self) -> BatchStats:
        """The running statistics as `BatchStats`."""
        return BatchStats(self.mean[...], self.var[...], self.count[...])

    def load_stats(self, stats: BatchStats) -> None:
        """Sets `mean`, `var` and `count` from `stats`, e.g. from a `bnjax.convert` function.

        Raises:
          ValueError: a field's shape or dtype differs from this layer's.
        """
        for name, value in stats._asdict().items():
            _assign(name, getattr(self, name), value)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        modulation: Modulation = None,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Normalizes `x` and, in training, updates the running statistics in place.

        Args:
          x: the input, batch axis first, features on the layer's `axis`.
          mask: optional boolean mask of the entries that count, by bnjax's mask rule.
          modulation: optional per-example `(scale, shift)` of `x`'s rank.
          use_running_average: eval mode (normalize with the running
            statistics, update nothing) when True; training when False;
            `None` takes the attribute `self.use_running_average`, which
            `model.train()` and `model.eval()` set.

        Returns:
          `y`, of `x`'s shape, in the layer's `dtype` (default `x`'s).
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        train = not use_running_average
        state = self.collected.get_value() if train and self.collected is not None else self.stats
        y, new_state = self.normalizer.apply(
            self.params, state, x, train, mask=mask, modulation=modulation
        )
        if isinstance(new_state, CollectedStats):
            assert self.collected is not None
            self.collected.set_value(new_state)
        elif train:
            self.mean[...], self.var[...], self.count[...] = new_state
        return y


class BatchNorm(_BatchNormalization):
    """BatchNorm as an NNX module; the numbers of `bnjax.batchnorm_apply`.

    `BatchNorm(num_features, *, use_running_average=False, rngs=None,
    **hyper)`, `hyper` the keywords of `bnjax.batchnorm`.

    Examples:
      >>> from bnjax import nnx as bnnx
      >>> bn = bnnx.BatchNorm(4, momentum=0.99)
      >>> y = bn(jnp.arange(8.0).reshape(2, 4))
      >>> bn.count[...]
      Array(1, dtype=int32)
    """

    _kind = layers.BATCHNORM


class BatchRenorm(_BatchNormalization):
    """Batch Renormalization as an NNX module; the numbers of `bnjax.batchrenorm_apply`.

    `BatchRenorm(num_features, *, use_running_average=False, rngs=None,
    **hyper)`, `hyper` the keywords of `bnjax.batchrenorm` (`r_max`, `d_max`, ...).
    """

    _kind = layers.BATCHRENORM


class LayerNorm(_StatelessNormalization):
    """LayerNorm as an NNX module; the numbers of `bnjax.layernorm_apply`.

    Examples:
      >>> from bnjax import nnx as bnnx
      >>> ln = bnnx.LayerNorm(8)
      >>> ln(jnp.ones((2, 8))).shape
      (2, 8)
    """

    def __init__(
        self, feature_shape: int | Sequence[int], *, rngs: nnx.Rngs | None = None, **hyper: Any
    ) -> None:
        """Creates `scale` and `bias` of shape `feature_shape`.

        Args:
          feature_shape: the shape of the normalized axes.
          rngs: unused; accepted as NNX layers take it.
          **hyper: the keywords of `bnjax.layernorm`. `axis` defaults to the
            last `len(feature_shape)` axes.
        """
        self._build(layers.LAYERNORM, feature_shape, hyper)


class RMSNorm(_StatelessNormalization):
    """RMSNorm as an NNX module; the numbers of `bnjax.rmsnorm_apply` (`bias` is None)."""

    def __init__(
        self, feature_shape: int | Sequence[int], *, rngs: nnx.Rngs | None = None, **hyper: Any
    ) -> None:
        """As `LayerNorm`; `**hyper` are the keywords of `bnjax.rmsnorm`."""
        self._build(layers.RMSNORM, feature_shape, hyper)


class GroupNorm(_StatelessNormalization):
    """GroupNorm as an NNX module; the numbers of `bnjax.groupnorm_apply`."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs | None = None, **hyper: Any) -> None:
        """Creates `scale` and `bias` of shape `(num_features,)`.

        Args:
          num_features: the size `C` of the feature axis.
          rngs: unused; accepted as NNX layers take it.
          **hyper: the keywords of `bnjax.groupnorm`: `num_groups` (default
            32, must divide `num_features`), `axis` (default -1), ...
        """
        self._build(layers.GROUPNORM, num_features, hyper)


class InstanceNorm(_StatelessNormalization):
    """InstanceNorm as an NNX module; the numbers of `bnjax.instancenorm_apply`."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs | None = None, **hyper: Any) -> None:
        """As `GroupNorm`; `**hyper` are the keywords of `bnjax.instancenorm`."""
        self._build(layers.INSTANCENORM, num_features, hyper)


def precise_batch_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    forward: Callable[[nnx.Module, Any], Any] = lambda model, batch: model(batch),
) -> None:
    """Sets every bnjax BatchNorm/BatchRenorm in `model` to precise statistics, in place.

    `bnjax.precise_batch_stats` for NNX models: each layer's running `mean`
    and `var` become the exact mean and biased variance of all the entries
    its input had over all `batches`, with every batch normalizer in training
    mode (earlier layers normalize with their batch's statistics) and every
    other module as it is (dropout stays off in an `eval()` model). `count`
    is unchanged.

    Args:
      model: an NNX module containing `bnjax.nnx.BatchNorm`/`BatchRenorm` layers.
      batches: an iterable of batches.
      forward: `forward(model, batch)`, the model's forward pass on a batch
        (its result is ignored). Default `model(batch)`.

    Raises:
      ValueError: `model` has no bnjax batch normalizer; a layer was not
        called by `forward`; `batches` is empty.
    """
    graphdef, variables = nnx.split(model)
    start = {path: layer.stats for path, layer in _batch_layers(model)}
    if not start:
        raise ValueError("`model` must contain a bnjax.nnx BatchNorm or BatchRenorm, got none.")

    def stats_fn(collecting: tuple[dict[Any, Any], Any], batch: Any) -> tuple[dict[Any, Any], Any]:
        per_layer, variables = collecting
        copy = nnx.merge(graphdef, variables)
        found = dict(_batch_layers(copy))
        for path, collected in per_layer.items():
            found[path].collected = nnx.Variable(collected)
            found[path].use_running_average = False
        forward(copy, batch)
        return {path: found[path].collected.get_value() for path in per_layer}, variables

    result, _ = precise.precise_batch_stats(stats_fn, (start, variables), batches)
    for path, layer in _batch_layers(model):
        layer.load_stats(result[path])


def weight_decay_mask(model: nnx.Module, wrt: Any = nnx.Param) -> Any:
    """`bnjax.weight_decay_mask` for NNX models: False for every bnjax layer's parameters.

    Args:
      model: an NNX module.
      wrt: the filter of the parameters the optimizer updates (`nnx.Optimizer`'s `wrt`).

    Returns:
      A pytree of bools of the structure of `nnx.as_pure(nnx.state(model, wrt))`,
      as optax's `mask=` expects inside `nnx.Optimizer`, e.g.
      `optax.adamw(1e-3, weight_decay=1e-4, mask=bnjax.nnx.weight_decay_mask(model))`.
    """
    norm_paths = {path for path, node in nnx.iter_graph(model) if isinstance(node, _Normalization)}
    state = nnx.as_pure(nnx.state(model, wrt))
    return jax.tree_util.tree_map_with_path(
        lambda path, _: tuple(k.key for k in path[:-1]) not in norm_paths, state
    )


def _batch_layers(model: nnx.Module) -> list[tuple[Any, _BatchNormalization]]:
    return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, _BatchNormalization)]


def _param(value: jax.Array | None) -> Any:
    return nnx.data(None) if value is None else nnx.Param(value)


def _value(variable: nnx.Variable[jax.Array] | None) -> jax.Array | None:
    return None if variable is None else variable[...]


def _assign(name: str, variable: nnx.Variable[jax.Array] | None, value: Any) -> None:
    if (variable is None) != (value is None):
        have = "none" if variable is None else "one"
        raise ValueError(
            f"`{name}` must be {'None' if variable is None else 'an array'} for this layer "
            f"(it has {have}), got {'None' if value is None else 'an array'}."
        )
    if variable is None:
        return
    old, new = jax.eval_shape(lambda: variable[...]), jax.eval_shape(lambda: value)
    if (old.shape, old.dtype) != (new.shape, new.dtype):
        raise ValueError(
            f"`{name}` must have shape {old.shape} and dtype {old.dtype}, "
            f"got shape {new.shape} and dtype {new.dtype}."
        )
    variable[...] = value
