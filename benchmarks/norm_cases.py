"""What `bench_norms.py` measures: workloads, ops, their inputs and the output check.

A case is one (workload, op) pair, one row of the table. Every implementation
of a case gets the same numbers (`Inputs`, float32 values exactly
representable in the workload's dtype, kept features last whatever the
workload's layout) and must return the same outputs, converted by its
`Bench.outputs` to float32 numpy arrays, features last, in bnjax's order:

* `train-fwd`: `(y, new running mean, new running var)`;
* `eval-fwd`, `fwd`: `(y,)`;
* `fwd+bwd`: the gradients of `sum(y * g)` w.r.t. `(x, scale[, bias])`.
"""

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

MOMENTUM = 0.9  # bnjax's convention: running = MOMENTUM * running + (1 - MOMENTUM) * batch
EPSILON = 1e-5  # BatchNorm, Batch Renorm, LayerNorm, GroupNorm
RMS_EPSILON = 1e-6  # RMSNorm
NUM_GROUPS = 32
# An output matches bnjax's when, elementwise,
#   |out - ref| <= RTOL * |ref| + ATOL * max(1, max |ref|).
# float32: different summation orders over ~1e5 terms differ by ~1e-6 relative;
# 1e-4 leaves room for that and catches wrong axes, groups, momentum or affine
# terms, but not effects smaller than that (epsilon 1e-5 vs 1e-6 on data of
# variance 4; dividing by n - 1 instead of n for large n).
# bfloat16: 8 significant bits (one rounding is 4e-3 relative), and some
# libraries compute the statistics or keep the parameters in bfloat16.
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (3e-2, 3e-2)}


class Workload(NamedTuple):
    """An input shape in its layout, and a dtype.

    `shape` is as the arrays are laid out: features last (NHWC, or NC for 2-D)
    unless `channels_first`, when it is NCHW, the channels on axis 1.
    """

    shape: tuple[int, ...]
    dtype: str  # "float32" or "bfloat16"
    channels_first: bool = False

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "NC"
        return "NCHW" if self.channels_first else "NHWC"

    @property
    def features_last_shape(self) -> tuple[int, ...]:
        """The shape with the channels last: NCHW (N, C, H, W) -> (N, H, W, C)."""
        if not self.channels_first:
            return self.shape
        return (self.shape[0], *self.shape[2:], self.shape[1])

    @property
    def name(self) -> str:
        short = {"float32": "f32", "bfloat16": "bf16"}[self.dtype]
        return f"{self.layout} ({','.join(map(str, self.shape))}) {short}"


class Op(NamedTuple):
    """A normalizer and what is computed with it."""

    norm: str  # "batchnorm", "batchrenorm", "layernorm", "groupnorm" or "rmsnorm"
    mode: str  # "train-fwd", "eval-fwd", "fwd" (stateless) or "fwd+bwd" (train mode)
    label: str

    @property
    def train(self) -> bool:
        return self.mode != "eval-fwd"


OPS = {
    "bn-train-fwd": Op("batchnorm", "train-fwd", "BN train fwd"),
    "bn-train-fwd+bwd": Op("batchnorm", "fwd+bwd", "BN train fwd+bwd"),
    "bn-eval-fwd": Op("batchnorm", "eval-fwd", "BN eval fwd"),
    "ln-fwd": Op("layernorm", "fwd", "LN(C) fwd"),
    "ln-fwd+bwd": Op("layernorm", "fwd+bwd", "LN(C) fwd+bwd"),
    "gn-fwd+bwd": Op("groupnorm", "fwd+bwd", f"GN({NUM_GROUPS}) fwd+bwd"),
    "rms-fwd": Op("rmsnorm", "fwd", "RMS(C) fwd"),
    "rms-fwd+bwd": Op("rmsnorm", "fwd+bwd", "RMS(C) fwd+bwd"),
    "brn-train-fwd+bwd": Op("batchrenorm", "fwd+bwd", "BRN train fwd+bwd"),
}


# The least memory traffic of each op, in multiples of the bytes of x, from
# which the effective bandwidth of a row is computed. Forward (`fwd`,
# `eval-fwd`): read x, write y. Training forward with batch statistics: one
# more read of x. Forward+backward over rows (LayerNorm, RMSNorm), whose
# statistics stay on chip: read x and g, write dx. With statistics over
# large strided blocks (BatchNorm, Batch Renorm, GroupNorm): x and g once for
# the statistics and the sums the gradient needs, then x and g again and dx.
TRAFFIC = {"fwd": 2, "eval-fwd": 2, "train-fwd": 3, "fwd+bwd": 5}
ROW_NORMS_FWD_BWD_TRAFFIC = 3


def ideal_bytes(workload: Workload, op: Op) -> int:
    """The bytes `op` must move at least on `workload` (see `TRAFFIC`)."""
    itemsize = {"float32": 4, "bfloat16": 2}[workload.dtype]
    passes = TRAFFIC[op.mode]
    if op.mode == "fwd+bwd" and op.norm in ("layernorm", "rmsnorm"):
        passes = ROW_NORMS_FWD_BWD_TRAFFIC
    return passes * itemsize * int(np.prod(workload.shape))


class Inputs(NamedTuple):
    """The numbers of one case, float32 numpy, features last, exact in `dtype`.

    When `channels_first` (an NCHW workload), every implementation takes x and g
    NCHW (`to_channels_first`, contiguous) and normalizes over axis 1; one that
    has no channels-first form is not applicable rather than timed on NHWC.
    """

    x: np.ndarray
    g: np.ndarray  # the cotangent of y for fwd+bwd
    params: tuple[np.ndarray, ...]  # (scale, bias), or (scale,) for RMSNorm; shape (C,)
    mean: np.ndarray  # running statistics, shape (C,)
    var: np.ndarray
    dtype: str
    channels_first: bool = False

    @property
    def channel_axis(self) -> int:
        """The channels' axis in the arrays the implementations take."""
        return 1 if self.channels_first else -1


class Bench(NamedTuple):
    """One implementation of one case, ready to time."""

    run: Callable[[], Any]  # the timed call, its inputs bound
    outputs: Callable[[Any], list[np.ndarray]]  # run's result, as described above


class Skip(Exception):
    """An implementation that is not timed for this case, with the reason."""


class NotApplicable(Skip):
    """The library has no such normalizer or mode."""


def require(module: str, package: str) -> ModuleType:
    """Imports `module`, or skips the implementation when `package` is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Skip(f"{package} is not installed") from error


def make_inputs(workload: Workload, op: Op, seed: int = 0) -> Inputs:
    """Random inputs: x with mean 0.5 and std 2, per-channel parameters near (1, 0).

    The running statistics are near the batch's, so that Batch Renorm's `r`
    and `d` are not clipped and eval mode gives outputs of order one. An NCHW
    workload gets the numbers of its NHWC twin (the same shape transposed).
    """
    rng = np.random.default_rng(seed)
    shape = workload.features_last_shape
    channels = shape[-1]
    x = _exact_in(rng.normal(0.5, 2.0, shape), workload.dtype)
    g = _exact_in(rng.normal(0.0, 1.0, shape), workload.dtype)
    scale = (1.0 + 0.2 * rng.normal(size=channels)).astype(np.float32)
    bias = (0.2 * rng.normal(size=channels)).astype(np.float32)
    mean = (0.5 + 0.2 * rng.normal(size=channels)).astype(np.float32)
    var = rng.uniform(2.0, 6.0, channels).astype(np.float32)
    params = (scale,) if op.norm == "rmsnorm" else (scale, bias)
    return Inputs(x, g, params, mean, var, workload.dtype, workload.channels_first)


def _exact_in(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values that `dtype` represents exactly, so every library reads the same."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(values, dtype).astype(jnp.float32))


def to_channels_first(x: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW (any rank >= 3); a 2-D (N, C) array is returned as it is."""
    return x if x.ndim <= 2 else np.moveaxis(x, -1, 1)


def from_channels_first(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC, the inverse of `to_channels_first`."""
    return x if x.ndim <= 2 else np.moveaxis(x, 1, -1)


def mismatch(outputs: list[np.ndarray], reference: list[np.ndarray], dtype: str) -> str | None:
    """Why `outputs` differ from `reference` beyond the dtype's tolerance, or None."""
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, expected {len(reference)}"
    rtol, atol = TOLERANCES[dtype]
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if out.size != ref.size:
            return f"output {i}: shape {out.shape}, expected {ref.shape}"
        error = np.abs(out.reshape(ref.shape) - ref)
        bound = rtol * np.abs(ref) + atol * max(1.0, float(np.max(np.abs(ref))))
        if not np.all(error <= bound):  # also catches NaN
            worst = int(np.nanargmax(error / bound)) if np.any(np.isfinite(error)) else 0
            return (
                f"output {i}: |error| {error.flat[worst]:.3g} > tolerance "
                f"{bound.flat[worst]:.3g} (value {ref.flat[worst]:.4g})"
            )
    return None
