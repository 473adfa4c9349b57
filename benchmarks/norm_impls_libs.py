"""Flax linen, Haiku and Equinox forwards, one `ForwardBuilder` per normalizer.

Each uses the library's own module with bnjax's hyperparameters (momentum,
epsilon, groups) and its defaults otherwise, and takes the case's scale and
bias as its parameters (and running statistics as its state), in the shape
and dtype the library keeps them. A library is imported when first used, so
that a missing one is skipped with the reason.

In NCHW rows each gets NCHW arrays and its own channels-first form (see
`NCHW_NOTES`); where it has none, the implementation is not applicable: the
harness never transposes on a library's behalf.
"""

from functools import partial

import jax
import jax.numpy as jnp
from norm_cases import (
    EPSILON,
    MOMENTUM,
    NUM_GROUPS,
    RMS_EPSILON,
    Inputs,
    NotApplicable,
    Op,
    require,
)
from norm_impls_jax import Forward, ForwardBuilder, device_array

# How each library treats bfloat16 inputs, and what the harness adapts.
NOTES = {
    "flax": "params float32 (param_dtype); dtype=input dtype, so y is bfloat16; statistics "
    "in float32 (force_float32_reductions); default use_fast_variance=True (E[x^2]-E[x]^2)",
    "haiku": "params created in the input's dtype (bfloat16), statistics in the input's "
    "dtype; BatchNorm var = E[x^2]-E[x]^2; the running statistics compared are the "
    "ExponentialMovingAverage's un-debiased `hidden`",
    "equinox": "params float32; LayerNorm/GroupNorm/RMSNorm compute in float32 and return "
    "the input's dtype; BatchNorm returns float32 for bfloat16 input, cast back by the "
    "harness; BatchNorm and GroupNorm take channels-first examples, so they get NCHW "
    "input; BatchNorm mode='batch', vmapped with axis_name; LayerNorm/RMSNorm vmapped "
    "over N, H, W",
}
# What each library does in the NCHW rows (BatchNorm and GroupNorm on NCHW arrays).
NCHW_NOTES = {
    "flax": "nn.BatchNorm(axis=1); nn.GroupNorm normalizes channels-last only (its "
    "reduction_axes must include the last axis), so GroupNorm is n/a in NCHW rows rather "
    "than timed behind a transpose (its NHWC time is in the NHWC rows)",
    "haiku": "hk.BatchNorm(data_format='channels_first'), hk.GroupNorm("
    "data_format='channels_first'); BatchNorm's params and moving averages shaped "
    "(1, C, 1, 1), GroupNorm's params (C, 1, 1), as Haiku makes them",
    "equinox": "BatchNorm and GroupNorm are channels-first natively (as in the NHWC rows), "
    "vmapped over N",
}


def _channels_last_only(inputs: Inputs, what: str) -> None:
    """Raises `NotApplicable` in NCHW rows for a module without a channels-first form."""
    if inputs.channels_first:
        raise NotApplicable(f"{what} is channels-last only")


# --- Flax linen ---------------------------------------------------------------


def flax_batchnorm(inputs: Inputs, op: Op) -> Forward:
    """`nn.BatchNorm` (`axis=1` in NCHW rows), its running statistics in `batch_stats`."""
    nn = require("flax.linen", "flax")
    model = nn.BatchNorm(
        use_running_average=not op.train,
        axis=inputs.channel_axis,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        dtype=jnp.dtype(inputs.dtype),
    )

    def fn(x, params, stats):
        variables = {"params": dict(zip(("scale", "bias"), params, strict=True)), **stats}
        if not op.train:
            return (model.apply(variables, x),)
        y, updates = model.apply(variables, x, mutable=["batch_stats"])
        return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

    stats = {"batch_stats": {"mean": jnp.asarray(inputs.mean), "var": jnp.asarray(inputs.var)}}
    x = device_array(inputs.x, inputs.dtype, inputs.channels_first)
    params = tuple(map(jnp.asarray, inputs.params))
    return Forward(fn, x, params, stats, inputs.channels_first)


def _flax_stateless(make_model, inputs: Inputs, op: Op) -> Forward:
    """A stateless linen module whose params are named "scale" (and "bias"); features last."""
    nn = require("flax.linen", "flax")
    _channels_last_only(inputs, f"flax.linen's {op.norm}")
    model = make_model(nn, jnp.dtype(inputs.dtype))

    def fn(x, params, state):
        names = ("scale", "bias")[: len(params)]
        return (model.apply({"params": dict(zip(names, params, strict=True))}, x),)

    x = device_array(inputs.x, inputs.dtype)
    return Forward(fn, x, tuple(map(jnp.asarray, inputs.params)))


FLAX: dict[str, ForwardBuilder] = {
    "batchnorm": flax_batchnorm,
    "layernorm": partial(
        _flax_stateless, lambda nn, dtype: nn.LayerNorm(epsilon=EPSILON, dtype=dtype)
    ),
    "groupnorm": partial(
        _flax_stateless,
        lambda nn, dtype: nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=EPSILON, dtype=dtype),
    ),
    "rmsnorm": partial(
        _flax_stateless, lambda nn, dtype: nn.RMSNorm(epsilon=RMS_EPSILON, dtype=dtype)
    ),
}


# --- Haiku --------------------------------------------------------------------


def _haiku(make_module, inputs: Inputs, op: Op, *, last_axis: bool = False) -> Forward:
    """A module under `hk.transform_with_state`, its params set to the case's.

    `make_module(hk, data_format)` gets "channels_first" in NCHW rows; a
    module over the last axis (`last_axis`) takes none and is not applicable
    there. For BatchNorm, both halves of each moving average (`hidden`,
    `average`) start at the case's running statistics, and the new `hidden`
    is returned.
    """
    hk = require("haiku", "dm-haiku")
    if last_axis:
        _channels_last_only(inputs, f"haiku's {op.norm} here (over the last axis)")
    data_format = "channels_first" if inputs.channels_first else "channels_last"
    transformed = hk.transform_with_state(
        lambda x: make_module(hk, data_format)(x, **_haiku_call(op))
    )
    x = device_array(inputs.x, inputs.dtype, inputs.channels_first)
    training = hk.transform_with_state(
        lambda x: make_module(hk, data_format)(x, **_haiku_call(op, True))
    )
    params0, state0 = training.init(jax.random.key(0), x)  # eval mode cannot create the state
    [(module, leaves0)] = params0.items()
    names = ("scale", "offset")[: len(inputs.params)]
    shapes = {name: leaves0[name].shape for name in names}
    params = tuple(
        jnp.asarray(p, leaves0[name].dtype).reshape(-1)
        for name, p in zip(names, inputs.params, strict=True)
    )
    state = _haiku_state(state0, inputs)

    def fn(x, params, state):
        values = {n: p.reshape(shapes[n]) for n, p in zip(names, params, strict=True)}
        y, new_state = transformed.apply({module: values}, state, None, x)
        if op.norm != "batchnorm" or not op.train:
            return (y,)
        return (y, *(new_state[k]["hidden"] for k in sorted(new_state)))  # mean_ema, var_ema

    return Forward(fn, x, params, state, inputs.channels_first)


def _haiku_call(op: Op, train: bool | None = None) -> dict:
    """The module's call arguments: BatchNorm's `is_training` (`op.train` by default)."""
    if op.norm != "batchnorm":
        return {}
    return {"is_training": op.train if train is None else train}


def _haiku_state(state0: dict, inputs: Inputs) -> dict:
    """BatchNorm's moving averages set to the running statistics; others as they are."""
    state = {}
    for key, ema in state0.items():
        value = inputs.mean if key.endswith("mean_ema") else inputs.var
        ema_value = jnp.asarray(value, ema["hidden"].dtype).reshape(ema["hidden"].shape)
        state[key] = {**ema, "hidden": ema_value, "average": ema_value}
    return state


HAIKU: dict[str, ForwardBuilder] = {
    "batchnorm": partial(
        _haiku,
        lambda hk, data_format: hk.BatchNorm(
            create_scale=True,
            create_offset=True,
            decay_rate=MOMENTUM,
            eps=EPSILON,
            data_format=data_format,
        ),
    ),
    "layernorm": partial(
        _haiku,
        lambda hk, _: hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=EPSILON),
        last_axis=True,
    ),
    "groupnorm": partial(
        _haiku,
        lambda hk, data_format: hk.GroupNorm(
            groups=NUM_GROUPS, eps=EPSILON, data_format=data_format
        ),
    ),
    "rmsnorm": partial(_haiku, lambda hk, _: hk.RMSNorm(axis=-1, eps=RMS_EPSILON), last_axis=True),
}


# --- Equinox ------------------------------------------------------------------


def equinox_batchnorm(inputs: Inputs, op: Op) -> Forward:
    """`eqx.nn.BatchNorm` with an `eqx.nn.State`, vmapped over N with `axis_name`.

    As Equinox documents: `jax.vmap(model, axis_name="batch", in_axes=(0, None),
    out_axes=(0, None))(x, state)`, each example channels-first (C, H, W).
    """
    eqx = require("equinox", "equinox")
    channels = inputs.x.shape[-1]
    model = eqx.nn.BatchNorm(
        channels,
        axis_name="batch",
        eps=EPSILON,
        momentum=MOMENTUM,
        inference=not op.train,
        mode="batch",
    )
    stats = (jnp.asarray(inputs.mean), jnp.asarray(inputs.var))
    state = eqx.nn.State(model).set(model.batch_state_index, stats)

    def fn(x, params, state):
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), model, params)
        batched = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        y, new_state = batched(x, state)
        y = y.astype(x.dtype)
        return (y, *new_state.get(model.batch_state_index)) if op.train else (y,)

    x = device_array(inputs.x, inputs.dtype, channels_first=True)
    return Forward(fn, x, tuple(map(jnp.asarray, inputs.params)), state, channels_first=True)


def _equinox_stateless(make_module, channels_first: bool, inputs: Inputs, op: Op) -> Forward:
    """A stateless module, vmapped over N (channels-first) or over all but C."""
    eqx = require("equinox", "equinox")
    if inputs.channels_first and not channels_first:
        _channels_last_only(inputs, f"equinox's {op.norm} here (vmapped over all but C)")
    module = make_module(eqx, inputs.x.shape[-1])
    x = device_array(inputs.x, inputs.dtype, channels_first)
    depth = 1 if channels_first else x.ndim - 1

    def fn(x, params, state):
        layer = eqx.tree_at(_equinox_params(len(params)), module, params)
        for _ in range(depth):
            layer = jax.vmap(layer)
        return (layer(x),)

    return Forward(fn, x, tuple(map(jnp.asarray, inputs.params)), None, channels_first)


def _equinox_params(count: int):
    if count == 1:
        return lambda m: (m.weight,)
    return lambda m: (m.weight, m.bias)


EQUINOX: dict[str, ForwardBuilder] = {
    "batchnorm": equinox_batchnorm,
    "layernorm": partial(
        _equinox_stateless, lambda eqx, c: eqx.nn.LayerNorm(c, eps=EPSILON), False
    ),
    "groupnorm": partial(
        _equinox_stateless,
        lambda eqx, c: eqx.nn.GroupNorm(NUM_GROUPS, c, eps=EPSILON),
        True,
    ),
    "rmsnorm": partial(
        _equinox_stateless,
        lambda eqx, c: eqx.nn.RMSNorm(c, eps=RMS_EPSILON, use_bias=False),
        False,
    ),
}
