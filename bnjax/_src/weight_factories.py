"""Factories that bind hyperparameters into `WeightNormalizer(init, apply)` pairs.

A weight normalization acts on a kernel, so its `init` takes the kernel
(weight norm reads its values, spectral norm its shape) and a `jax.random`
key where it needs one, instead of an input shape. Its `apply` has the
signature of `Normalizer.apply`, `(params, state, kernel, train) ->
(normalized_kernel, new_state)`, with `None` for the part a method does not
have. Hyperparameters are checked once, when the factory is called.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from bnjax._src import checks
from bnjax._src.spectralnorm import spectralnorm_apply, spectralnorm_init
from bnjax._src.types import NormParams, SpectralState, WeightNormalizer
from bnjax._src.weightnorm import weightnorm_apply, weightnorm_init


def weightnorm(
    *, axis: int = -1, epsilon: float = 1e-12, param_dtype: DTypeLike = jnp.float32
) -> WeightNormalizer:
    """Weight Normalization as a `WeightNormalizer`; see `weightnorm_apply`.

    `init(kernel, key=None) -> (NormParams(scale, None), None)`, the scale
    from `weightnorm_init(kernel)` (the key is not used);
    `apply(params, None, v, train) -> (w, None)`, the same in both modes.

    Examples:
      >>> wn = bnjax.weightnorm()
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 3))
      >>> params, state = wn.init(kernel)
      >>> w, state = wn.apply(params, state, kernel, True)
      >>> bool(jnp.allclose(w, kernel)), state
      (True, None)
    """
    checks.check_epsilon(epsilon)

    def init(kernel: jax.Array, key: jax.Array | None = None) -> tuple[NormParams, None]:
        return weightnorm_init(kernel, axis=axis, param_dtype=param_dtype), None

    def apply(
        params: NormParams, state: None, kernel: jax.Array, train: bool
    ) -> tuple[jax.Array, None]:
        checks.check_train(train)
        return weightnorm_apply(params, kernel, axis=axis, epsilon=epsilon), state

    return WeightNormalizer(init, apply)


def spectralnorm(
    *,
    axis: int = -1,
    num_iterations: int = 1,
    epsilon: float = 1e-12,
    param_dtype: DTypeLike = jnp.float32,
) -> WeightNormalizer:
    """Spectral Normalization as a `WeightNormalizer`; see `spectralnorm_apply`.

    `init(kernel, key) -> (None, SpectralState)`, from
    `spectralnorm_init(kernel.shape, key)` (`kernel` may be a
    `jax.ShapeDtypeStruct`); `apply(None, state, kernel, train) ->
    (kernel / sigma, new_state)`.

    Examples:
      >>> sn = bnjax.spectralnorm(num_iterations=2)
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
      >>> params, state = sn.init(kernel, jax.random.key(1))
      >>> w, state = sn.apply(params, state, kernel, True)
      >>> params, state.u.shape, state.v.shape
      (None, (8,), (36,))
    """
    checks.check_size("num_iterations", num_iterations)
    checks.check_epsilon(epsilon)

    def init(kernel: Any, key: jax.Array | None = None) -> tuple[None, SpectralState]:
        if key is None:
            raise ValueError(
                "`key` must be a `jax.random` key for the power iteration's random start, "
                "got None. Call `init(kernel, jax.random.key(0))`."
            )
        return None, spectralnorm_init(kernel.shape, key, axis=axis, param_dtype=param_dtype)

    def apply(
        params: None, state: SpectralState, kernel: jax.Array, train: bool
    ) -> tuple[jax.Array, SpectralState]:
        return spectralnorm_apply(
            state, kernel, train, axis=axis, num_iterations=num_iterations, epsilon=epsilon
        )

    return WeightNormalizer(init, apply)
