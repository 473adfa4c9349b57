"""Spectral Normalization: a kernel divided by its largest singular value, by power iteration."""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from bnjax._src import checks, stats
from bnjax._src.types import SpectralState

# Matrix-vector products in full precision on every backend: they are
# cheap, and a bfloat16 pass (the TPU default for float32) would cap the
# accuracy of sigma at ~1e-3.
_PRECISION = lax.Precision.HIGHEST


def spectralnorm_init(
    kernel_shape: Sequence[int],
    key: jax.Array,
    *,
    axis: int = -1,
    param_dtype: DTypeLike = jnp.float32,
) -> SpectralState:
    """Creates the power iteration's starting vectors: random, of unit length.

    The kernel is viewed as the matrix `W` of shape `(outputs, rest)`, the
    output axis first and every other axis flattened in order (see
    `SpectralState`). Unlike PyTorch's `spectral_norm`, which runs 15 power
    iterations when it is attached, this needs only the shape; the first
    training-mode calls refine the vectors (or call `spectralnorm_apply`
    once with a larger `num_iterations`).

    Args:
      kernel_shape: the kernel's shape, rank >= 2, e.g. `(in, out)` or
        `(H, W, in, out)`.
      key: a `jax.random` key.
      axis: the output axis. Default -1.
      param_dtype: dtype of the vectors. Default float32.

    Returns:
      `SpectralState(u, v)`: `u` of shape `(outputs,)`, `v` of shape
      `(rest,)`, each drawn from a normal distribution and scaled to unit
      length.

    Raises:
      ValueError: `kernel_shape` has rank < 2 or a size < 1; `axis` is out
        of range.

    Examples:
      >>> state = bnjax.spectralnorm_init((3, 3, 8, 16), jax.random.key(0))
      >>> state.u.shape, state.v.shape
      ((16,), (72,))
    """
    shape = tuple(kernel_shape)
    for i, n in enumerate(shape):
        checks.check_size(f"kernel_shape[{i}]", n)
    out_axis = checks.check_kernel_shape(shape, axis, name="kernel_shape", min_rank=2)
    outputs = shape[out_axis]
    key_u, key_v = jax.random.split(key)
    u = jax.random.normal(key_u, (outputs,), param_dtype)
    v = jax.random.normal(key_v, (math.prod(shape) // outputs,), param_dtype)
    return SpectralState(u=u / jnp.linalg.norm(u), v=v / jnp.linalg.norm(v))


def spectralnorm_apply(
    state: SpectralState,
    w: jax.Array,
    train: bool,
    *,
    axis: int = -1,
    num_iterations: int = 1,
    epsilon: float = 1e-12,
) -> tuple[jax.Array, SpectralState]:
    """Divides a kernel by its largest singular value `sigma`, estimated by power iteration.

    `w` is viewed as the matrix `W` of shape `(outputs, rest)`: the output
    axis `axis` first, every other axis flattened in order. In training
    mode, `num_iterations` power iterations refine the state, each
    `u = normalize(W v)` then `v = normalize(W^T u)`, with
    `normalize(x) = x / max(||x||, epsilon)`; then `sigma = u^T W v` and the
    result is `w / sigma`. The vectors are held out of the gradient, so
    `sigma`'s gradient reaches the kernel only through `W` in `u^T W v`, as
    in Miyato et al. and PyTorch. In eval mode `sigma` comes from the stored
    `u` and `v` and the state is returned unchanged. This is
    `torch.nn.utils.parametrizations.spectral_norm` on PyTorch's
    `(out, in, ...)` layout, step for step.

    Args:
      state: `SpectralState(u, v)` from `spectralnorm_init` or the previous
        training call; `u` of shape `(outputs,)`, `v` of shape `(rest,)`.
      w: floating kernel of rank >= 2, outputs on `axis`.
      train: Python bool, static under `jax.jit`: refine the vectors, or
        use them as they are.
      axis: the output axis. Default -1 (`(in, out)`, `HWIO`).
      num_iterations: power iterations per training call, >= 1. Default 1.
      epsilon: lower bound of the norms in `normalize`, > 0. Default 1e-12.

    Returns:
      `(w / sigma, new_state)`: the normalized kernel, of `w`'s shape and
      dtype, and the refined `SpectralState` (`state` itself in eval mode),
      of the state's dtype. The arithmetic runs in the wider of the state's
      dtype and float32 (or `w`'s, if wider).

    Raises:
      TypeError: `w` is not floating; `train` is not a Python bool (a traced
        one must be made static); `axis` is not an int.
      ValueError: `w` has rank < 2; `axis` is out of range; the state does
        not match `w`; `num_iterations < 1`; `epsilon <= 0`.

    Examples:
      >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> state = bnjax.spectralnorm_init(w.shape, jax.random.key(0))
      >>> w_sn, state = bnjax.spectralnorm_apply(state, w, True, num_iterations=20)
      >>> w_sn.round(4)
      Array([[1. , 0. ],
             [0. , 0.5]], dtype=float32)

    References:
      Miyato, Kataoka, Koyama & Yoshida 2018, Spectral Normalization for
      Generative Adversarial Networks, arXiv:1802.05957.
    """
    checks.check_train(train)
    out_axis = checks.check_kernel(w, axis, name="w", min_rank=2)
    checks.check_size("num_iterations", num_iterations)
    checks.check_epsilon(epsilon)
    outputs = w.shape[out_axis]
    what = f"the kernel `w` with shape {w.shape} and output axis {out_axis}"
    checks.check_param_shape("state.u", state.u, (outputs,), what)
    checks.check_param_shape("state.v", state.v, (w.size // outputs,), what)
    dtype = jnp.promote_types(stats.stats_dtype(w.dtype), jnp.result_type(state.u))
    matrix = jnp.moveaxis(w, out_axis, 0).reshape(outputs, -1).astype(dtype)
    u, v = state.u.astype(dtype), state.v.astype(dtype)
    if train:
        u, v = _power_iterations(lax.stop_gradient(matrix), u, v, num_iterations, epsilon)
        new_state = SpectralState(u.astype(state.u.dtype), v.astype(state.v.dtype))
    else:
        new_state = state
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    sigma = jnp.dot(u, jnp.matmul(matrix, v, precision=_PRECISION), precision=_PRECISION)
    return (w.astype(dtype) / sigma).astype(w.dtype), new_state


def _power_iterations(
    matrix: jax.Array, u: jax.Array, v: jax.Array, num_iterations: int, epsilon: float
) -> tuple[jax.Array, jax.Array]:
    """`num_iterations` times: `u = normalize(W v)`, then `v = normalize(W^T u)`."""

    def normalize(x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.linalg.norm(x), epsilon)

    def iteration(_: Any, uv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        _, v = uv
        u = normalize(jnp.matmul(matrix, v, precision=_PRECISION))
        return u, normalize(jnp.matmul(u, matrix, precision=_PRECISION))

    refined: tuple[jax.Array, jax.Array] = lax.fori_loop(0, num_iterations, iteration, (u, v))
    return refined
