"""PyTorch (CPU, functional ops) and numpy-ml implementations.

PyTorch runs eagerly and synchronously on the CPU, so a plain call is timed.
Its tensors are NCHW, either contiguous (`torch-nchw`) or with
`memory_format=torch.channels_last` (`torch-nhwc`); LayerNorm and RMSNorm over
C permute the channels last first, a view for channels_last and a copy (made
inside the op) for contiguous NCHW. NCHW rows are PyTorch's own layout, timed
as `torch-nchw`; `torch-nhwc` is skipped there (its layout is the NHWC
rows'). numpy-ml has only BatchNorm and LayerNorm, channels-last, with
hand-written backward passes, float32 here as the inputs.
"""

import collections
import collections.abc
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from norm_cases import (
    EPSILON,
    MOMENTUM,
    NUM_GROUPS,
    RMS_EPSILON,
    Bench,
    Inputs,
    NotApplicable,
    Op,
    Skip,
    from_channels_first,
    require,
    to_channels_first,
)

NOTES = {
    "torch": "batch_norm, layer_norm, group_norm take float32 weights with bfloat16 input "
    "(mixed-dtype kernels); rms_norm's fused kernel needs the weight in the input's "
    "dtype, so its weight is bfloat16; momentum 0.1 (= bnjax's 0.9); its running var is "
    "unbiased, converted to bnjax's biased one for the check",
    "numpy-ml": "float32 arrays and params; BatchNorm2D (4-D) or BatchNorm1D (2-D); "
    "LayerNorm1D on x reshaped to (N*H*W, C); no bfloat16 in numpy",
}
# What each does in the NCHW rows.
NCHW_NOTES = {
    "torch": "torch-nchw: contiguous NCHW tensors, PyTorch's default layout; torch-nhwc "
    "(channels_last) is skipped in NCHW rows, its layout being the NHWC rows'",
    "numpy-ml": "BatchNorm2D takes (N, H, W, C) only: n/a in NCHW rows",
}


# --- PyTorch --------------------------------------------------------------------


def _over_channels(fn: Callable, x):
    """`fn` applied with the channels last (NCHW -> NHWC view), the result back in NCHW."""
    if x.dim() <= 2:
        return fn(x)
    return fn(x.movedim(1, -1)).movedim(-1, 1)


def _torch_forward(torch, op: Op, channels: int) -> Callable:
    """`forward(x, weights, mean, var) -> y` of `op.norm` with torch.nn.functional."""
    functional = torch.nn.functional
    if op.norm == "batchnorm":
        return lambda x, w, mean, var: functional.batch_norm(
            x, mean, var, *w, training=op.train, momentum=1 - MOMENTUM, eps=EPSILON
        )
    if op.norm == "layernorm":
        return lambda x, w, mean, var: _over_channels(
            lambda t: functional.layer_norm(t, (channels,), *w, eps=EPSILON), x
        )
    if op.norm == "groupnorm":
        return lambda x, w, mean, var: functional.group_norm(x, NUM_GROUPS, *w, eps=EPSILON)
    if op.norm == "rmsnorm":
        return lambda x, w, mean, var: _over_channels(
            lambda t: functional.rms_norm(t, (channels,), w[0], eps=RMS_EPSILON), x
        )
    raise NotApplicable(f"no {op.norm}")


def torch_bench(inputs: Inputs, op: Op, *, channels_last: bool) -> Bench:
    """`op` with torch.nn.functional on NCHW tensors of the given memory format."""
    torch = require("torch", "torch")
    if channels_last and inputs.x.ndim == 2:
        raise Skip("2-D input has one layout (see torch-nchw)")
    if channels_last and inputs.channels_first:
        raise Skip("an NCHW row: contiguous NCHW is torch-nchw; channels_last is the NHWC rows'")
    forward = _torch_forward(torch, op, inputs.x.shape[-1])
    dtype = getattr(torch, inputs.dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    device = _torch_device(torch)

    def tensor(values: np.ndarray):
        t = torch.from_numpy(np.array(to_channels_first(values)))  # a writable copy
        return t.to(device=device, dtype=dtype, memory_format=memory_format)

    x, g = tensor(inputs.x), tensor(inputs.g)
    weight_dtype = dtype if op.norm == "rmsnorm" else torch.float32
    weights = [torch.from_numpy(p).to(device=device, dtype=weight_dtype) for p in inputs.params]
    mean, var = (torch.from_numpy(s).to(device) for s in (inputs.mean, inputs.var))
    if op.mode == "fwd+bwd":
        run = _torch_forward_and_backward(torch, forward, x, weights, g)
    else:
        run = _torch_forward_only(torch, forward, x, weights, mean, var, op.mode)
    if device == "cuda":
        run = _synchronized(torch, run)
    count = inputs.x.size // inputs.x.shape[-1]
    return Bench(run, lambda out: _torch_outputs(out, op, inputs.var, count))


def _torch_device(torch) -> str:
    """Where PyTorch runs: CUDA when JAX's default backend is a GPU, else the CPU."""
    import jax

    if jax.default_backend() != "gpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise Skip("JAX runs on a GPU but this PyTorch has no CUDA")
    return "cuda"


def _synchronized(torch, run: Callable[[], tuple]) -> Callable[[], tuple]:
    """`run` that returns once its CUDA kernels have finished, as JAX's results are awaited."""

    def synchronized_run() -> tuple:
        out = run()
        torch.cuda.synchronize()
        return out

    return synchronized_run


def _torch_forward_only(torch, forward, x, weights, mean, var, mode: str) -> Callable[[], tuple]:
    """No-grad forward; in train-fwd mode, from fresh copies of the running statistics."""
    running_mean, running_var = mean.clone(), var.clone()

    def run() -> tuple:
        with torch.no_grad():
            if mode != "train-fwd":
                return (forward(x, weights, running_mean, running_var),)
            running_mean.copy_(mean)
            running_var.copy_(var)
            y = forward(x, weights, running_mean, running_var)
            return y, running_mean, running_var

    return run


def _torch_forward_and_backward(torch, forward, x, weights, g) -> Callable[[], tuple]:
    """`y.backward(g)` and the gradients of x and the weights (BatchNorm: no running stats,
    as the JAX versions, whose new state is dropped)."""
    leaves = [t.detach().requires_grad_() for t in (x, *weights)]

    def run() -> tuple:
        for t in leaves:
            t.grad = None
        forward(leaves[0], leaves[1:], None, None).backward(g)
        return tuple(t.grad for t in leaves)

    return run


def _torch_outputs(out: tuple, op: Op, var0: np.ndarray, count: int) -> list[np.ndarray]:
    """float32 numpy outputs, the first NHWC; PyTorch's unbiased running var made biased."""
    first, *rest = [t.detach().float().cpu().numpy() for t in out]
    rest = [a.reshape(-1) for a in rest]
    if op.mode == "train-fwd":
        unbiased = (rest[1] - MOMENTUM * var0) / (1 - MOMENTUM)
        rest[1] = MOMENTUM * var0 + (1 - MOMENTUM) * unbiased * (count - 1) / count
    return [from_channels_first(first), *rest]


# --- numpy-ml -------------------------------------------------------------------


def _numpy_ml_layers():
    """numpy-ml's layers module, importable on Python >= 3.10.

    numpy-ml 0.1.2 imports `Hashable` and friends from `collections` (they live in
    `collections.abc` since Python 3.10) and warns about optional dependencies.
    """
    for name in ("Hashable", "Iterable", "Mapping", "MutableMapping", "Sequence", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("numpy_ml.neural_nets.layers", "numpy-ml")


def _numpy_ml_layer(inputs: Inputs, op: Op) -> tuple[Any, np.ndarray]:
    """The layer for `op.norm`, its float32 parameters set, and the array it takes."""
    layers = _numpy_ml_layers()
    if inputs.channels_first:
        raise NotApplicable("its layers take channels-last arrays only")
    x, channels = inputs.x, inputs.x.shape[-1]
    if op.norm == "batchnorm" and x.ndim in (2, 4):
        kind = layers.BatchNorm1D if x.ndim == 2 else layers.BatchNorm2D
        layer = kind(momentum=MOMENTUM, epsilon=EPSILON)
    elif op.norm == "layernorm":
        layer, x = layers.LayerNorm1D(epsilon=EPSILON), x.reshape(-1, channels)
    else:
        raise NotApplicable(f"no {op.norm}")
    layer.in_ch = layer.out_ch = layer.n_in = layer.n_out = channels
    layer._init_params()
    scale, bias = inputs.params
    layer.parameters.update(scaler=scale.copy(), intercept=bias.copy())
    if op.norm == "batchnorm":
        layer.parameters.update(running_mean=inputs.mean.copy(), running_var=inputs.var.copy())
    layer.gradients = {k: np.zeros_like(v) for k, v in layer.gradients.items()}
    layer.gradients.update(scaler=np.zeros_like(scale), intercept=np.zeros_like(bias))
    return layer, x


def numpy_ml_bench(inputs: Inputs, op: Op) -> Bench:
    """numpy-ml's `forward` (and hand-written `backward`) of its BatchNorm or LayerNorm."""
    if inputs.dtype != "float32":
        raise Skip(f"numpy has no {inputs.dtype} arithmetic")
    layer, x = _numpy_ml_layer(inputs, op)
    g = inputs.g.reshape(x.shape)

    def run() -> tuple:
        layer.flush_gradients()  # forget the inputs cached by the previous call
        if op.mode == "fwd+bwd":
            layer.forward(x)
            dx = layer.backward(g)
            return dx, layer.gradients["scaler"], layer.gradients["intercept"]
        if op.mode != "train-fwd":
            return (layer.forward(x, retain_derived=False),)
        layer.parameters.update(running_mean=inputs.mean.copy(), running_var=inputs.var.copy())
        y = layer.forward(x)
        return y, layer.parameters["running_mean"], layer.parameters["running_var"]

    def outputs(out: tuple) -> list[np.ndarray]:
        first, *rest = [np.asarray(a, np.float32) for a in out]
        return [first.reshape(inputs.x.shape), *(a.reshape(-1) for a in rest)]

    return Bench(run, outputs)
