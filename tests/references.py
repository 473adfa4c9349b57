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


def full_mask(mask, shape):
    """SPEC's mask rule in numpy: the boolean `mask` broadcast to `shape`.

    A mask with fewer axes than `shape` is aligned with its leading axes: it
    gets trailing axes of size 1, and then numpy's broadcasting applies
    (`(N,)` on `(N, H, W, C)` is `(N, 1, 1, 1)`).
    """
    mask = np.asarray(mask, bool)
    return np.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim)), shape)


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


# --- closed-form gradients -------------------------------------------------------
# The vjps of `sum(y * cotangent)` for the normalizers above, written out in
# float64 (no autodiff), each entry of `x` counted once whether masked or not.


def _standardized_vjp(x, weights, cotangent, axes, epsilon):
    """`xhat = (x - mean) / sigma` over `axes` and the vjp of `sum(xhat * cotangent)`.

    With `n` the count of entries with weight 1 and the sums over every entry
    of `axes` (a masked entry's output depends on the statistics too):
    `dx = (cotangent - w * (sum(cotangent) + xhat * sum(cotangent * xhat)) / n) / sigma`.
    A masked entry (`w = 0`) keeps only `cotangent / sigma`.
    """
    mean, var = _weighted_moments(x, weights, axes)
    count = weights.sum(axis=axes, keepdims=True)
    sigma = np.sqrt(var + epsilon)
    xhat = (x - mean) / sigma
    first = cotangent.sum(axis=axes, keepdims=True) / count
    second = (cotangent * xhat).sum(axis=axes, keepdims=True) / count
    return xhat, (cotangent - weights * (first + xhat * second)) / sigma


def _per_feature(values, axis):
    """`values` reduced over every axis but `axis`, as a 1-D array."""
    return values.sum(axis=tuple(a for a in range(values.ndim) if a != axis))


def batchnorm_grads(x, scale, cotangent, *, axis=-1, epsilon=1e-5, mask=None, r=None, d=None):
    """Training-mode BatchNorm's `(dx, dscale, dbias)` of `sum(y * cotangent)`, float64.

    With `r` and `d` (shape `(C,)`, held constant) this is Batch Renorm's:
    `y = (xhat * r + d) * scale + bias`.
    """
    x = np.asarray(x, np.float64)
    cotangent = np.asarray(cotangent, np.float64)
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    scale = np.asarray(scale, np.float64).reshape(shape)
    r = 1.0 if r is None else np.asarray(r, np.float64).reshape(shape)
    d = 0.0 if d is None else np.asarray(d, np.float64).reshape(shape)
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    xhat, dx = _standardized_vjp(x, _weights(x, mask), cotangent * scale * r, reduced, epsilon)
    return dx, _per_feature(cotangent * (xhat * r + d), axis), _per_feature(cotangent, axis)


def _per_example_layout(x, scale, cotangent, axes):
    """float64 `x`, `scale` (shaped to broadcast) and `cotangent`; sorted `axes`, the kept ones."""
    x = np.asarray(x, np.float64)
    axes = tuple(sorted(a % x.ndim for a in axes))
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    scale = np.asarray(scale, np.float64).reshape(
        [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    )
    return x, np.asarray(cotangent, np.float64), scale, axes, kept


def layernorm_grads(x, scale, cotangent, *, axes=(-1,), epsilon=1e-5, mask=None):
    """LayerNorm's `(dx, dscale, dbias)` of `sum(y * cotangent)`, float64; `scale`
    has the normalized axes' shape, as do `dscale` and `dbias`."""
    x, cotangent, scale, axes, kept = _per_example_layout(x, scale, cotangent, axes)
    xhat, dx = _standardized_vjp(x, _weights(x, mask), cotangent * scale, axes, epsilon)
    return dx, (cotangent * xhat).sum(axis=kept), cotangent.sum(axis=kept)


def rmsnorm_grads(x, scale, cotangent, *, axes=(-1,), epsilon=1e-6, mask=None):
    """RMSNorm's `(dx, dscale)` of `sum(y * cotangent)`, float64.

    With `r = (mean(w x^2) + epsilon)^(-1/2)` over `axes`, `n` the count and
    `c = cotangent * scale`: `dx = r * (c - w * x * r^2 * sum(c * x) / n)`.
    """
    x, cotangent, scale, axes, kept = _per_example_layout(x, scale, cotangent, axes)
    w = _weights(x, mask)
    count = w.sum(axis=axes, keepdims=True)
    r = 1 / np.sqrt((w * x**2).sum(axis=axes, keepdims=True) / count + epsilon)
    c = cotangent * scale
    dx = r * (c - w * x * r**2 * (c * x).sum(axis=axes, keepdims=True) / count)
    return dx, (cotangent * x * r).sum(axis=kept)


def groupnorm_grads(x, scale, cotangent, *, num_groups, axis=-1, epsilon=1e-5, mask=None):
    """GroupNorm's `(dx, dscale, dbias)` of `sum(y * cotangent)`, float64.

    The channels-last view of `x` is split into `(..., num_groups, C // num_groups)`
    and each example and group standardized over all its entries.
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    xl = np.moveaxis(x, axis, -1)
    channels = xl.shape[-1]
    grouped = (*xl.shape[:-1], num_groups, channels // num_groups)
    cl = np.moveaxis(np.asarray(cotangent, np.float64), axis, -1)
    wl = np.moveaxis(_weights(x, mask), axis, -1)
    c = cl * np.asarray(scale, np.float64)
    reduced = (*range(1, xl.ndim - 1), xl.ndim)
    xhat, dx = _standardized_vjp(
        xl.reshape(grouped), wl.reshape(grouped), c.reshape(grouped), reduced, epsilon
    )
    xhat = xhat.reshape(xl.shape)
    per_channel = tuple(range(xl.ndim - 1))
    return (
        np.moveaxis(dx.reshape(xl.shape), -1, axis),
        (cl * xhat).sum(axis=per_channel),
        cl.sum(axis=per_channel),
    )


def modulate(y, scale, shift):
    """Per-example conditioning in float64: `y * (1 + scale) + shift` (None: left out)."""
    y = np.asarray(y, np.float64)
    if scale is not None:
        y = y * (1 + np.asarray(scale, np.float64))
    if shift is not None:
        y = y + np.asarray(shift, np.float64)
    return y


def gemma_rmsnorm(x, g, *, axes=(-1,), epsilon=1e-6):
    """Gemma's RMSNorm in float64: `x / sqrt(mean(x**2) + epsilon) * (1 + g)`, g zero-centered."""
    return rmsnorm(x, 1 + np.asarray(g, np.float64), axes=axes, epsilon=epsilon)


def running_stats_with_warmup(batch_means, batch_vars, momentum, *, mean=0.0, var=1.0):
    """Running statistics after each batch, with SPEC's warm-up, in float64.

    Update `k` (0-based, `k` = the count before it) is the cumulative average
    `running + (batch - running) / (k + 1)` while `k < 1 / (1 - momentum)`,
    with `1 / (1 - momentum)` taken exactly from the momentum's decimal
    digits, then `momentum * running + (1 - momentum) * batch`. Returns the
    list of `(mean, var)` after each update.
    """
    from fractions import Fraction

    m = Fraction(repr(float(momentum)))
    mean = np.broadcast_to(np.asarray(mean, np.float64), np.shape(batch_means[0]))
    var = np.broadcast_to(np.asarray(var, np.float64), np.shape(batch_vars[0]))
    history = []
    for k, (batch_mean, batch_var) in enumerate(zip(batch_means, batch_vars, strict=True)):
        batch_mean = np.asarray(batch_mean, np.float64)
        batch_var = np.asarray(batch_var, np.float64)
        if m == 1 or k < 1 / (1 - m):
            mean = mean + (batch_mean - mean) / (k + 1)
            var = var + (batch_var - var) / (k + 1)
        else:
            mean = float(m) * mean + (1 - float(m)) * batch_mean
            var = float(m) * var + (1 - float(m)) * batch_var
        history.append((mean, var))
    return history


def kernel_matrix(w, axis=-1):
    """A kernel as the float64 matrix `(outputs, rest)`: the output axis first, the rest flat."""
    w = np.asarray(w, np.float64)
    return np.moveaxis(w, axis % w.ndim, 0).reshape(w.shape[axis], -1)


def weight_standardize(w, *, axis=-1, epsilon=1e-5):
    """Weight Standardization in float64: per output, over every other axis, biased variance."""
    w = np.asarray(w, np.float64)
    reduced = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    mean = w.mean(axis=reduced, keepdims=True)
    var = ((w - mean) ** 2).mean(axis=reduced, keepdims=True)
    return (w - mean) / np.sqrt(var + epsilon)


def spectralnorm_grad(w, u, v, cotangent, *, axis=-1):
    """d/dw of sum(cotangent * w / sigma), sigma = u^T W v with u, v constant (float64).

    With c and w as matrices: c / sigma - (sum(c * w) / sigma^2) u v^T.
    """
    matrix, c = kernel_matrix(w, axis), kernel_matrix(cotangent, axis)
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    sigma = u @ matrix @ v
    grad = c / sigma - (np.sum(c * matrix) / sigma**2) * np.outer(u, v)
    shape = np.moveaxis(np.asarray(w), axis % np.ndim(w), 0).shape
    return np.moveaxis(grad.reshape(shape), 0, axis % np.ndim(w))
