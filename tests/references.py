"""Independent references: float64 numpy formulas, and numpy-ml's layers.

Nothing here imports bnjax. Every expected value in the tests comes from
these functions or from another library, never from the code under test.
"""

import collections
import collections.abc
import importlib
import warnings

import numpy as np


def batchnorm(x, scale, bias, *, axis=-1, epsilon=1e-5, mask=None):
    """Training-mode BatchNorm in float64: returns (y, batch_mean, batch_var).

    `mask` is boolean, already broadcastable to `x` (feature axis of size 1).
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    weights = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    count = weights.sum(axis=reduced, keepdims=True)
    mean = (weights * x).sum(axis=reduced, keepdims=True) / count
    var = (weights * (x - mean) ** 2).sum(axis=reduced, keepdims=True) / count
    y = affine((x - mean) / np.sqrt(var + epsilon), scale, bias, axis)
    return y, mean.reshape(-1), var.reshape(-1)


def batchnorm_eval(x, scale, bias, mean, var, *, axis=-1, epsilon=1e-5):
    """Eval-mode BatchNorm in float64, with given running statistics."""
    x = np.asarray(x, np.float64)
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    mean = np.asarray(mean, np.float64).reshape(shape)
    var = np.asarray(var, np.float64).reshape(shape)
    return affine((x - mean) / np.sqrt(var + epsilon), scale, bias, axis)


def layernorm(x, scale, bias, *, axes=(-1,), epsilon=1e-5, mask=None):
    """LayerNorm in float64 over `axes`; scale and bias have those axes' shape.

    With `mask` (boolean, broadcastable to `x`) only the entries where it is
    True enter the statistics; every entry is normalized.
    """
    x = np.asarray(x, np.float64)
    axes = tuple(sorted(a % x.ndim for a in axes))
    mean, var = _weighted_moments(x, _weights(x, mask), axes)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    y = (x - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


def affine(normalized, scale, bias, axis):
    shape = [1] * normalized.ndim
    shape[axis % normalized.ndim] = -1
    if scale is not None:
        normalized = normalized * np.asarray(scale, np.float64).reshape(shape)
    if bias is not None:
        normalized = normalized + np.asarray(bias, np.float64).reshape(shape)
    return normalized


def numpy_ml_layers():
    """numpy-ml's `neural_nets.layers` module, importable on Python >= 3.10.

    numpy-ml 0.1.2 imports `Hashable` and friends from `collections`, which
    moved to `collections.abc`; it also warns at import about optional
    dependencies it does not need here.
    """
    for name in ("Hashable", "Iterable", "Mapping", "MutableMapping", "Sequence", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("numpy_ml.neural_nets.layers")


def running_stats(batch_means, batch_vars, momentum, *, mean=0.0, var=1.0):
    """Running mean and variance in float64 after folding in the given batches.

    `momentum` is the weight of the old value (`running = m * running + (1 - m)
    * batch`); `None` gives the plain average of the batch statistics. The
    defaults are the initial state (mean 0, variance 1).
    """
    batch_means = [np.asarray(m, np.float64) for m in batch_means]
    batch_vars = [np.asarray(v, np.float64) for v in batch_vars]
    if momentum is None:
        return np.mean(batch_means, axis=0), np.mean(batch_vars, axis=0)
    mean = np.broadcast_to(np.asarray(mean, np.float64), batch_means[0].shape)
    var = np.broadcast_to(np.asarray(var, np.float64), batch_vars[0].shape)
    for batch_mean, batch_var in zip(batch_means, batch_vars, strict=True):
        mean = momentum * mean + (1 - momentum) * batch_mean
        var = momentum * var + (1 - momentum) * batch_var
    return mean, var


def numpy_ml_layer(name, x_shape, scaler, intercept, **hyperparameters):
    """A numpy-ml normalization layer with the given `scaler` and `intercept`.

    numpy-ml creates its parameters lazily in `forward` and draws `scaler` at
    random; this initializes the layer up front (so its bookkeeping, such as
    the zeroed `gradients`, is numpy-ml's own) and then replaces both
    parameters with the given float64 values. `name` is `BatchNorm1D`,
    `BatchNorm2D`, `LayerNorm1D` or `LayerNorm2D`; `x_shape` is the input's.
    """
    layer = getattr(numpy_ml_layers(), name)(**hyperparameters)
    size = x_shape[-1]
    if name.endswith("1D"):
        layer.n_in = layer.n_out = size
    else:
        layer.in_ch = layer.out_ch = size
    if name == "LayerNorm2D":
        layer._init_params(x_shape)
    else:
        layer._init_params()
    layer.parameters["scaler"] = np.array(scaler, np.float64)
    layer.parameters["intercept"] = np.array(intercept, np.float64)
    return layer


def _weights(x, mask):
    """Float64 weights of `x`'s shape: 1 where an entry counts, 0 where masked."""
    if mask is None:
        return np.ones_like(x)
    return np.broadcast_to(np.asarray(mask), x.shape).astype(np.float64)


def _weighted_moments(x, weights, axes):
    """Mean and biased variance over `axes` of the entries with weight 1."""
    count = weights.sum(axis=axes, keepdims=True)
    mean = (weights * x).sum(axis=axes, keepdims=True) / count
    var = (weights * (x - mean) ** 2).sum(axis=axes, keepdims=True) / count
    return mean, var


def groupnorm(x, scale, bias, *, num_groups, axis=-1, epsilon=1e-5, mask=None):
    """GroupNorm in float64, written with explicit loops over examples and groups.

    Channel `c` of the `axis` axis is in group `c // (C // num_groups)`; each
    example (axis 0) and group is normalized over all its entries. `mask` is
    boolean and broadcastable to `x` (channel axis of size 1 or C).
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    xl = np.moveaxis(x, axis, -1)
    wl = np.moveaxis(_weights(x, mask), axis, -1)
    size = xl.shape[-1] // num_groups
    y = np.empty_like(xl)
    for n in range(xl.shape[0]):
        for g in range(num_groups):
            block = xl[n, ..., g * size : (g + 1) * size]
            w = wl[n, ..., g * size : (g + 1) * size]
            mean = (w * block).sum() / w.sum()
            var = (w * (block - mean) ** 2).sum() / w.sum()
            y[n, ..., g * size : (g + 1) * size] = (block - mean) / np.sqrt(var + epsilon)
    return affine(np.moveaxis(y, -1, axis), scale, bias, axis)


def instancenorm(x, scale, bias, *, axis=-1, epsilon=1e-5, mask=None):
    """InstanceNorm in float64: each example and channel over all other axes."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    reduced = tuple(a for a in range(1, x.ndim) if a != axis)
    mean, var = _weighted_moments(x, _weights(x, mask), reduced)
    return affine((x - mean) / np.sqrt(var + epsilon), scale, bias, axis)


def rmsnorm(x, scale, *, axes=(-1,), epsilon=1e-6, mask=None):
    """RMSNorm in float64: `x / sqrt(mean(x**2) + epsilon) * scale` over `axes`."""
    x = np.asarray(x, np.float64)
    axes = tuple(sorted(a % x.ndim for a in axes))
    w = _weights(x, mask)
    mean_square = (w * x**2).sum(axis=axes, keepdims=True) / w.sum(axis=axes, keepdims=True)
    y = x / np.sqrt(mean_square + epsilon)
    if scale is not None:
        shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
        y = y * np.asarray(scale, np.float64).reshape(shape)
    return y


def batchrenorm(
    x,
    scale,
    bias,
    running_mean,
    running_var,
    *,
    axis=-1,
    epsilon=1e-5,
    r_max=3.0,
    d_max=5.0,
    mask=None,
    r=None,
    d=None,
):
    """Training-mode Batch Renormalization in float64 (Ioffe 2017, Algorithm 1).

    Returns `(y, batch_mean, batch_var, r, d)`, the statistics and corrections
    of shape `(C,)`. Given `r` and `d` are used as constants instead of being
    computed (to differentiate with them held fixed).
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    mean, var = _weighted_moments(x, _weights(x, mask), reduced)
    shape = [1] * x.ndim
    shape[axis] = -1
    running_mean = np.asarray(running_mean, np.float64).reshape(shape)
    sigma = np.sqrt(np.asarray(running_var, np.float64).reshape(shape) + epsilon)
    sigma_batch = np.sqrt(var + epsilon)
    if r is None:
        r = np.clip(sigma_batch / sigma, 1 / r_max, r_max)
    if d is None:
        d = np.clip((mean - running_mean) / sigma, -d_max, d_max)
    r = np.asarray(r, np.float64).reshape(shape)
    d = np.asarray(d, np.float64).reshape(shape)
    y = affine((x - mean) / sigma_batch * r + d, scale, bias, axis)
    return y, mean.reshape(-1), var.reshape(-1), r.reshape(-1), d.reshape(-1)


def ghost_batchnorm(x, scale, bias, *, virtual_batch_size, axis=-1, epsilon=1e-5, mask=None):
    """Ghost BatchNorm in float64: each run of `virtual_batch_size` examples on its own.

    Returns `(y, mean, var)`: `mean` and `var` of shape `(C,)` are the averages
    of the groups' statistics, each group weighted by how many entries count.
    `mask` is boolean and broadcastable to `x` (feature axis of size 1).
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    w = _weights(x, mask)
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    y = np.empty_like(x)
    means, variances, counts = [], [], []
    for start in range(0, x.shape[0], virtual_batch_size):
        part = slice(start, start + virtual_batch_size)
        mean, var = _weighted_moments(x[part], w[part], reduced)
        y[part] = (x[part] - mean) / np.sqrt(var + epsilon)
        means.append(mean.reshape(-1))
        variances.append(var.reshape(-1))
        counts.append(w[part].sum(axis=reduced))
    counts = np.asarray(counts)
    mean = (counts * np.asarray(means)).sum(axis=0) / counts.sum(axis=0)
    var = (counts * np.asarray(variances)).sum(axis=0) / counts.sum(axis=0)
    return affine(y, scale, bias, axis), mean, var


def conv(x, kernel):
    """Stride-1 SAME convolution in float64, channels last: `x` is `(N, *spatial,
    C_in)`, `kernel` is `(*window, C_in, C_out)` (HWIO). SAME pads each spatial
    axis by `(k - 1) // 2` before and `k // 2` after, as `lax.conv_general_dilated`.
    """
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    window = kernel.shape[:-2]
    d = len(window)
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in window] + [(0, 0)]
    patches = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, pads), window, axis=tuple(range(1, 1 + d))
    )
    # patches: (N, *spatial, C_in, *window), contracted with the kernel's (*window, C_in).
    return np.tensordot(patches, kernel, axes=(list(range(-d - 1, 0)), [d, *range(d)]))
