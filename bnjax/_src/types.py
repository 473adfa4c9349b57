"""The containers every normalizer passes around.

Both are NamedTuples, hence pytrees: they go through `jax.jit`, `jax.grad`,
`jax.tree.map`, optax and checkpointing without registration.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax


class NormParams(NamedTuple):
    """Learnable affine parameters of a normalizer.

    Attributes:
      scale: multiplies the normalized input (gamma). Shape `(C,)` for the
        normalizers with a feature axis, or the shape of the normalized axes
        for LayerNorm. `None` when created with `use_scale=False`.
      bias: added after scaling (beta). Same shape as `scale`. `None` when
        created with `use_bias=False`.
    """

    scale: jax.Array | None
    bias: jax.Array | None


class BatchStats(NamedTuple):
    """Running statistics of BatchNorm, used in eval mode.

    Attributes:
      mean: running mean per feature, shape `(C,)`.
      var: running biased variance per feature, shape `(C,)`; unbiased (as
        PyTorch) with `batchnorm_apply(..., unbiased_running_var=True)`.
      count: int32 scalar, the number of training updates folded in so far.
        It drives the cumulative average of `momentum=None`.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # the field hides tuple.count: python/mypy#3950


class CollectedStats(NamedTuple):
    """A BatchNorm state that collects batch moments for `precise_batch_stats`.

    `precise_batch_stats` puts one in place of each `BatchStats` before it
    runs the model. A training-mode `batchnorm_apply` or `batchrenorm_apply`
    given one normalizes as usual, and returns it with this call's batch
    moments pooled in, instead of a running update: a layer called several
    times pools over all of its calls. Being its own type, it makes
    `jax.jit` trace anew; no trace made for `BatchStats` can be reused.

    Attributes:
      running: the layer's `BatchStats`, passed through unchanged (Batch
        Renorm's corrections read them).
      mean: shape `(C,)`, the mean of every entry pooled so far.
      var: shape `(C,)`, their biased variance.
      count: int32 scalar, how many entries per feature were pooled.
      calls: int32 scalar, how many training-mode calls pooled into it.
    """

    running: BatchStats
    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # the field hides tuple.count: python/mypy#3950
    calls: jax.Array


class SpectralState(NamedTuple):
    """The power iteration's vectors of spectral normalization.

    A kernel `w` is viewed as the matrix `W` of shape `(outputs, rest)`:
    the output axis first, every other axis flattened in order (for a
    `HWIO` kernel, `rest` runs over `(H, W, I)`). Training-mode
    `spectralnorm_apply` refines both vectors and returns them; they carry
    no gradient.

    Attributes:
      u: shape `(outputs,)`, unit length: the estimated left singular vector.
      v: shape `(rest,)`, unit length: the estimated right singular vector.
    """

    u: jax.Array
    v: jax.Array


class WeightNormalizer(NamedTuple):
    """A weight normalization with its hyperparameters bound: an `(init, apply)` pair.

    Returned by `bnjax.weightnorm(...)` and `bnjax.spectralnorm(...)`, so a
    model switches from one to the other by changing one call. It acts on a
    kernel, not on activations: `apply` is called on the raw kernel and
    returns the kernel the layer uses.

    Attributes:
      init: `init(kernel, key=None) -> (params, state)`: learnable
        parameters (`NormParams` for weight norm, `None` for spectral norm)
        and running state (`None`, or `SpectralState`, whose random start
        needs `key`).
      apply: `apply(params, state, kernel, train) -> (normalized_kernel,
        new_state)`, the signature of `Normalizer.apply`.
    """

    init: Callable[..., tuple[Any, Any]]
    apply: Callable[..., tuple[jax.Array, Any]]


class InitFn(Protocol):
    """Creates a normalizer's parameters and state for inputs of a shape."""

    def __call__(self, input_shape: Sequence[int]) -> tuple[NormParams, Any]:
        """Returns `(params, state)` for inputs of `input_shape`.

        Args:
          input_shape: the full input shape, batch axis included, as in
            stax (e.g. `x.shape`).

        Returns:
          `(params, state)`: `NormParams`, and the running state
          (`BatchStats` for the batch normalizers, `None` otherwise).
        """


class ApplyFn(Protocol):
    """Normalizes an input; the same signature for every normalizer."""

    def __call__(
        self,
        params: NormParams,
        state: Any,
        x: jax.Array,
        train: bool,
        *,
        mask: jax.Array | None = None,
        modulation: tuple[jax.Array | None, jax.Array | None] | None = None,
    ) -> tuple[jax.Array, Any]:
        """Returns `(y, new_state)`.

        Args:
          params: from `init`, or trained.
          state: from `init` or the previous call; `None` when stateless.
          x: the input, of the shape `init` was given (any batch size).
          train: Python bool, static under `jax.jit`. Stateless normalizers
            compute the same thing in both modes.
          mask: optional boolean mask of entries that contribute to the
            statistics, by the one mask rule every normalizer shares: of
            `x`'s rank it broadcasts by numpy's rules; with fewer axes it is
            aligned with `x`'s leading axes (`(N,)` masks examples); it
            never varies along a feature axis.
          modulation: optional per-example `(scale, shift)`, arrays of
            `x`'s rank that broadcast to it (`(N, 1, C)` for tokens
            `(N, T, C)`, `(N, 1, 1, C)` for NHWC images), applied after the
            learned affine as `y * (1 + scale) + shift`, in the statistics
            dtype. Either may be None.

        Returns:
          `(y, new_state)`: `y` of `x`'s shape, in the factory's `dtype`
          (default `x`'s); `new_state` is `state` for stateless normalizers
          and in eval mode.
        """


class Normalizer(NamedTuple):
    """A normalizer with its hyperparameters bound: an `(init, apply)` pair.

    Returned by the factories `bnjax.batchnorm(...)`, `layernorm(...)`, ...,
    so a model switches normalizer by changing one call.

    Attributes:
      init: `init(input_shape) -> (params, state)`.
      apply: `apply(params, state, x, train, *, mask=None, modulation=None)
        -> (y, new_state)`.
    """

    init: InitFn
    apply: ApplyFn
