"""Precise BatchNorm statistics against a float64 numpy forward pass.

The reference runs each model in numpy, batch by batch, in training mode
(every BatchNorm normalizes with its own batch's statistics, so a later
layer's input depends on the earlier layers' batch statistics), records the
input of every BatchNorm, and takes the mean and biased variance of all of
them together. The merge is tested where float32 would fail: with more
than 2^24 entries per feature, and with a layer called several times per
batch (a shared layer, a scan carry), whose calls all pool into one result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from tests import references
from tests.helpers import random_input, random_params

# bnjax runs the forward pass in float32, the reference in float64. Each
# BatchNorm input is a float32 dot product (<= 36 terms of size O(1), error
# ~1e-6), and the second layer's input also carries the first layer's float32
# normalization (~1e-6 relative); the pooled moments are float32 reductions
# over <= ~1e3 entries per batch (~log2(n) eps32 ~ 1e-6), merged in float64.
# 2e-5 leaves a margin of ~5 over that; a variance averaged per batch instead
# of pooled is off by O(0.1) here (the batches have different means).
PRECISE_TOL = {"rtol": 2e-5, "atol": 2e-5}


def _dense_params(rng, sizes):
    """Weights of a dense -> BN -> relu -> dense -> BN stack, and the BN states."""
    params, state = {}, {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), jnp.float32)
        bn_params, state[f"bn{i}"] = bnjax.batchnorm_init(n_out)
        params[f"bn{i}"] = bn_params._replace(
            scale=jnp.asarray(rng.uniform(0.5, 2.0, n_out), jnp.float32),
            bias=jnp.asarray(rng.normal(size=n_out), jnp.float32),
        )
    return params, state


def _mlp(params, state, x, train, **bn_kwargs):
    new_state = {}
    h = x
    for i in range(len(state)):
        h = jnp.dot(h, params[f"w{i}"], precision=lax.Precision.HIGHEST)
        h, new_state[f"bn{i}"] = bnjax.batchnorm_apply(
            params[f"bn{i}"], state[f"bn{i}"], h, train, **bn_kwargs
        )
        if i < len(state) - 1:
            h = jax.nn.relu(h)
    return h, new_state


def _mlp_reference(params, batches, masks=None, virtual_batch_size=None):
    """The inputs of every BatchNorm over all batches, float64, training mode.

    Returns `{name: (values, weights)}`, stacked over all batches, with a
    weight of 0 for masked rows.
    """
    names = [k for k in params if k.startswith("bn")]
    inputs = {name: [] for name in names}
    weights = {name: [] for name in names}
    for b, x in enumerate(batches):
        mask = None if masks is None else np.asarray(masks[b])
        h = np.asarray(x, np.float64)
        for i, name in enumerate(names):
            h = h @ np.asarray(params[f"w{i}"], np.float64)
            inputs[name].append(h)
            weights[name].append(np.ones(len(h)) if mask is None else mask.astype(np.float64))
            bn = params[name]
            if virtual_batch_size is not None:
                h, _, _ = references.ghost_batchnorm(
                    h, bn.scale, bn.bias, virtual_batch_size=virtual_batch_size
                )
            else:
                h, _, _ = references.batchnorm(
                    h, bn.scale, bn.bias, mask=None if mask is None else mask[:, None]
                )
            if i < len(names) - 1:
                h = np.maximum(h, 0)
    return {n: (np.concatenate(inputs[n]), np.concatenate(weights[n])) for n in names}


def _pooled(values, weights=None):
    """Mean and biased variance per feature over every axis but the last, float64."""
    values = values.reshape(-1, values.shape[-1])
    w = np.ones(len(values)) if weights is None else weights.reshape(-1)
    mean = (w[:, None] * values).sum(0) / w.sum()
    var = (w[:, None] * (values - mean) ** 2).sum(0) / w.sum()
    return mean, var


def _batches(rng, sizes, n_in, *, offset=True):
    """Batches of unequal sizes whose means differ, so pooling matters."""
    return [
        jnp.asarray(rng.normal(size=(n, n_in)) * (1 + i) + (i if offset else 0), jnp.float32)
        for i, n in enumerate(sizes)
    ]


def _assert_precise(state, reference):
    for name, (values, weights) in reference.items():
        mean, var = _pooled(values, weights)
        np.testing.assert_allclose(state[name].mean, mean, **PRECISE_TOL)
        np.testing.assert_allclose(state[name].var, var, **PRECISE_TOL)


def test_precise_stats_of_mlp_equal_pooled_moments_of_each_layer_input():
    rng = np.random.default_rng(0)
    params, state = _dense_params(rng, [6, 8, 5])
    batches = _batches(rng, [7, 12, 5], 6)

    new_state = bnjax.precise_batch_stats(lambda s, b: _mlp(params, s, b, True)[1], state, batches)

    _assert_precise(new_state, _mlp_reference(params, batches))


def test_precise_stats_differ_from_average_of_per_batch_variances():
    """The expected values are pooled: averaging per-batch variances would fail."""
    rng = np.random.default_rng(1)
    params, state = _dense_params(rng, [6, 8])
    batches = _batches(rng, [7, 12, 5], 6)

    new_state = bnjax.precise_batch_stats(lambda s, b: _mlp(params, s, b, True)[1], state, batches)

    values, _ = _mlp_reference(params, batches)["bn0"]
    sizes = np.cumsum([0, 7, 12, 5])
    per_batch = [_pooled(values[a:b])[1] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    assert np.max(np.abs(np.mean(per_batch, 0) - np.asarray(new_state["bn0"].var))) > 0.1


def test_precise_stats_leave_count_and_other_state_unchanged():
    rng = np.random.default_rng(2)
    params, state = _dense_params(rng, [6, 8, 5])
    state = {**state, "bn0": state["bn0"]._replace(count=jnp.int32(17)), "step": jnp.int32(3)}

    def stats_fn(s, b):
        return {**_mlp(params, {k: s[k] for k in ("bn0", "bn1")}, b, True)[1], "step": s["step"]}

    new_state = bnjax.precise_batch_stats(stats_fn, state, _batches(rng, [4, 6], 6))

    assert int(new_state["bn0"].count) == 17 and int(new_state["bn1"].count) == 0
    assert new_state["step"] is state["step"]
    assert new_state["bn0"].mean.dtype == jnp.float32


def _conv_model(params, state, x, train):
    new_state = {}
    h = x
    for i in range(2):
        h = lax.conv_general_dilated(
            h,
            params[f"w{i}"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )
        h, new_state[f"bn{i}"] = bnjax.batchnorm_apply(params[f"bn{i}"], state[f"bn{i}"], h, train)
        h = jax.nn.relu(h)
    return h, new_state


def test_precise_stats_of_conv_net_equal_pooled_moments_of_each_layer_input():
    rng = np.random.default_rng(3)
    params, state = {}, {}
    for i, (c_in, c_out) in enumerate([(3, 4), (4, 5)]):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) / 5, jnp.float32)
        params[f"bn{i}"], state[f"bn{i}"] = bnjax.batchnorm_init(c_out)
    batches = [
        jnp.asarray(rng.normal(size=(n, 5, 6, 3)) + i, jnp.float32) for i, n in enumerate([3, 5, 2])
    ]

    new_state = bnjax.precise_batch_stats(
        lambda s, b: _conv_model(params, s, b, True)[1], state, batches
    )

    inputs = {"bn0": [], "bn1": []}
    for x in batches:
        h = np.asarray(x, np.float64)
        for i in range(2):
            h = references.conv(h, params[f"w{i}"])
            inputs[f"bn{i}"].append(h.reshape(-1, h.shape[-1]))
            h = np.maximum(references.batchnorm(h, None, None)[0], 0)
    _assert_precise(new_state, {n: (np.concatenate(v), None) for n, v in inputs.items()})


def test_precise_stats_with_masks_weight_each_batch_by_unmasked_count():
    rng = np.random.default_rng(4)
    params, state = _dense_params(rng, [6, 8, 5])
    batches = _batches(rng, [8, 10, 6], 6)
    fractions = [0.3, 0.9, 0.6]
    masks = [
        jnp.asarray(rng.uniform(size=len(b)) < p) for b, p in zip(batches, fractions, strict=True)
    ]

    new_state = bnjax.precise_batch_stats(
        lambda s, bm: _mlp(params, s, bm[0], True, mask=bm[1])[1],
        state,
        list(zip(batches, masks, strict=True)),
    )

    _assert_precise(new_state, _mlp_reference(params, batches, masks=masks))


def test_precise_stats_with_ghost_batches_are_those_of_whole_batches():
    rng = np.random.default_rng(5)
    params, state = _dense_params(rng, [6, 8, 5])
    batches = _batches(rng, [8, 12], 6)

    new_state = bnjax.precise_batch_stats(
        lambda s, b: _mlp(params, s, b, True, virtual_batch_size=4)[1], state, batches
    )

    _assert_precise(new_state, _mlp_reference(params, batches, virtual_batch_size=4))


def test_precise_stats_synchronized_over_shard_map_pool_all_devices():
    rng = np.random.default_rng(6)
    params, state = _dense_params(rng, [6, 8, 5])
    batches = _batches(rng, [16, 24], 6)
    masks = [jnp.asarray(rng.uniform(size=len(b)) < 0.7) for b in batches]
    mesh = jax.make_mesh((jax.device_count(),), ("data",))

    def per_device(s, x, mask):
        return _mlp(params, s, x, True, axis_name="data", mask=mask)[1]

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
    )
    split = NamedSharding(mesh, P("data"))
    placed = [jax.device_put(bm, split) for bm in zip(batches, masks, strict=True)]
    new_state = bnjax.precise_batch_stats(lambda s, bm: sharded(s, *bm), state, placed)

    _assert_precise(new_state, _mlp_reference(params, batches, masks=masks))


def test_precise_stats_of_layers_stacked_for_scan_are_per_layer():
    rng = np.random.default_rng(7)
    num_layers, width = 3, 4
    kernels = jnp.asarray(rng.normal(size=(num_layers, width, width)) / 2, jnp.float32)
    bn_params, bn_state = jax.vmap(lambda _: bnjax.batchnorm_init(width))(jnp.arange(num_layers))
    batches = _batches(rng, [5, 9], width)

    def stats_fn(stacked_state, x):
        def layer(h, p_and_s):
            kernel, bn, s = p_and_s
            h, s = bnjax.batchnorm_apply(bn, s, h @ kernel, True)
            return jax.nn.relu(h), s

        return lax.scan(layer, x, (kernels, bn_params, stacked_state))[1]

    new_state = bnjax.precise_batch_stats(stats_fn, bn_state, batches)

    inputs = [[] for _ in range(num_layers)]
    for x in batches:
        h = np.asarray(x, np.float64)
        for i in range(num_layers):
            h = h @ np.asarray(kernels[i], np.float64)
            inputs[i].append(h)
            h = np.maximum(references.batchnorm(h, None, None)[0], 0)
    for i in range(num_layers):
        mean, var = _pooled(np.concatenate(inputs[i]))
        np.testing.assert_allclose(new_state.mean[i], mean, **PRECISE_TOL)
        np.testing.assert_allclose(new_state.var[i], var, **PRECISE_TOL)
    np.testing.assert_array_equal(new_state.count, bn_state.count)


def test_function_jitted_before_the_call_retraces_and_gives_precise_stats():
    """A function the user jitted (and ran) on `BatchStats` is traced anew:
    the state it gets inside `precise_batch_stats` is of another type."""
    rng = np.random.default_rng(8)
    params, state = _dense_params(rng, [6, 8, 5])
    batches = _batches(rng, [4, 4, 4], 6)
    traces = []

    def model_stats(s, x):
        traces.append(jax.tree.structure(s))
        return _mlp(params, s, x, True)[1]

    jitted = jax.jit(model_stats)
    jitted(state, batches[0])  # traced and cached in ordinary training mode

    new_state = bnjax.precise_batch_stats(jitted, state, batches)

    _assert_precise(new_state, _mlp_reference(params, batches))
    assert len(set(traces)) == 2  # once for BatchStats, once for the collecting type


def test_precise_stats_reject_a_batchnorm_run_in_eval_mode():
    rng = np.random.default_rng(9)
    params, state = _dense_params(rng, [6, 8])

    with pytest.raises(ValueError, match="`train` must be True"):
        bnjax.precise_batch_stats(
            lambda s, b: _mlp(params, s, b, False)[1], state, _batches(rng, [4], 6)
        )


def test_precise_stats_reject_a_layer_that_is_never_called_naming_it():
    rng = np.random.default_rng(13)
    params, state = _dense_params(rng, [6, 8, 5])
    state = {**state, "unused": bnjax.batchnorm_init(5)[1]}

    def stats_fn(s, x):
        new_state = _mlp(params, {k: s[k] for k in ("bn0", "bn1")}, x, True)[1]
        return {**new_state, "unused": s["unused"]}

    with pytest.raises(ValueError, match=r"\['unused'\].*not called"):
        bnjax.precise_batch_stats(stats_fn, state, _batches(rng, [4, 6], 6))


def test_precise_stats_reject_empty_batches_and_states_without_batchnorm():
    params, state = bnjax.batchnorm_init(3)
    with pytest.raises(ValueError, match="at least one batch"):
        bnjax.precise_batch_stats(lambda s, b: s, state, [])
    with pytest.raises(ValueError, match="at least one `BatchStats`"):
        bnjax.precise_batch_stats(lambda s, b: s, {"w": jnp.ones(3)}, [jnp.ones((2, 3))])


def test_function_first_traced_by_precise_stats_still_trains_normally_afterwards():
    """A trace cached in collection mode updates running statistics as usual later."""
    rng = np.random.default_rng(10)
    params, state = _dense_params(rng, [6, 8])
    batches = _batches(rng, [4, 4], 6)
    train_state = jax.jit(lambda s, x: _mlp(params, s, x, True)[1])

    bnjax.precise_batch_stats(train_state, state, batches)  # first trace, collection mode
    new_state = train_state(state, batches[0])  # same shapes: the cached trace

    values, _ = _mlp_reference(params, batches[:1])["bn0"]
    mean, var = references.running_stats([values.mean(0)], [values.var(0)], 0.9)
    np.testing.assert_allclose(new_state["bn0"].mean, mean, **PRECISE_TOL)
    np.testing.assert_allclose(new_state["bn0"].var, var, **PRECISE_TOL)
    assert int(new_state["bn0"].count) == 1


def test_precise_stats_of_batch_renorm_layers_use_the_given_running_stats_per_batch():
    """Batch Renorm's forward pass reads the running statistics (r and d): each
    batch sees the state passed in, and its layers are re-estimated as BatchNorm's."""
    rng = np.random.default_rng(11)
    params, state = _dense_params(rng, [6, 8, 5])
    state = {
        name: s._replace(mean=jnp.full_like(s.mean, 0.5), var=jnp.full_like(s.var, 0.3))
        for name, s in state.items()
    }
    batches = _batches(rng, [7, 9], 6)

    def stats_fn(s, x):
        h = x @ params["w0"]
        h, s0 = bnjax.batchrenorm_apply(params["bn0"], s["bn0"], h, True, r_max=1.5, d_max=0.5)
        h = jax.nn.relu(h) @ params["w1"]
        _, s1 = bnjax.batchrenorm_apply(params["bn1"], s["bn1"], h, True, r_max=1.5, d_max=0.5)
        return {"bn0": s0, "bn1": s1}

    new_state = bnjax.precise_batch_stats(stats_fn, state, batches)

    inputs = {"bn0": [], "bn1": []}
    for x in batches:
        h = np.asarray(x, np.float64) @ np.asarray(params["w0"], np.float64)
        inputs["bn0"].append(h)
        bn, s = params["bn0"], state["bn0"]
        h = references.batchrenorm(h, bn.scale, bn.bias, s.mean, s.var, r_max=1.5, d_max=0.5)[0]
        inputs["bn1"].append(np.maximum(h, 0) @ np.asarray(params["w1"], np.float64))
    _assert_precise(new_state, {n: (np.concatenate(v), None) for n, v in inputs.items()})


# --- a layer called several times pools over all of its calls ------------------


def test_precise_stats_of_a_layer_applied_twice_pool_both_calls():
    """One BatchNorm, its state threaded through two calls per batch (to `x`
    and to `2 x + 1`): its statistics are those of all six inputs together."""
    rng = np.random.default_rng(14)
    params = random_params(rng, (2,))
    _, state = bnjax.batchnorm_init(2)
    batches = [jnp.asarray(random_input(rng, (n, 2)) + i) for i, n in enumerate([5, 8, 6])]

    def stats_fn(s, x):
        _, s = bnjax.batchnorm_apply(params, s, x, True)
        _, s = bnjax.batchnorm_apply(params, s, 2 * x + 1, True)
        return s

    new_state = bnjax.precise_batch_stats(stats_fn, state, batches)

    first = [np.asarray(x, np.float64) for x in batches]
    second = [2 * x + 1 for x in first]
    mean, var = _pooled(np.concatenate(first + second))
    np.testing.assert_allclose(new_state.mean, mean, **PRECISE_TOL)
    np.testing.assert_allclose(new_state.var, var, **PRECISE_TOL)
    # The data discriminate: the last call's inputs alone (what a state that
    # kept only one call per batch would report) have other statistics.
    last_mean, last_var = _pooled(np.concatenate(second))
    assert np.min(np.abs(last_mean - mean)) > 0.1 and np.min(np.abs(last_var - var)) > 0.1
    assert int(new_state.count) == int(state.count)


def test_precise_stats_of_a_layer_in_a_scan_carry_pool_every_step():
    """A recurrent block: one BatchNorm whose state rides in a `lax.scan` carry
    is called at each of 3 steps, and pools the inputs of all of them."""
    rng = np.random.default_rng(15)
    width, steps = 4, 3
    kernel = jnp.asarray(rng.normal(size=(width, width)), jnp.float32)
    params = random_params(rng, (width,))
    _, state = bnjax.batchnorm_init(width)
    batches = _batches(rng, [6, 9], width)

    def stats_fn(s, x):
        def step(carry, _):
            h, s = carry
            z = jnp.tanh(jnp.dot(h, kernel, precision=lax.Precision.HIGHEST))
            h, s = bnjax.batchnorm_apply(params, s, z, True)
            return (h, s), None

        (_, s), _ = lax.scan(step, (x, s), length=steps)
        return s

    new_state = bnjax.precise_batch_stats(stats_fn, state, batches)

    inputs = []
    for x in batches:
        h = np.asarray(x, np.float64)
        for _ in range(steps):
            z = np.tanh(h @ np.asarray(kernel, np.float64))
            inputs.append(z)
            h = references.batchnorm(z, params.scale, params.bias)[0]
    mean, var = _pooled(np.concatenate(inputs))
    np.testing.assert_allclose(new_state.mean, mean, **PRECISE_TOL)
    np.testing.assert_allclose(new_state.var, var, **PRECISE_TOL)


# --- counts stay exact beyond float32's integers -------------------------------

# (entries per feature as rows x columns, value): constant batches, so each
# batch's mean (+-1) and variance (0) are exact in float32, and the pooled
# mean, 1 / (2^25 + 3), rests on the exact counts alone.
HUGE_BATCHES = [((4095, 4097), 1.0), ((24929, 673), -1.0), ((3, 1), 1.0)]


def test_precise_stats_count_entries_exactly_beyond_two_to_the_24():
    """A feature sees 2^25 + 3 entries: float32 cannot count them (2^24 + 1
    rounds to 2^24), and a count off by one here moves the mean by half."""
    _, state = bnjax.batchnorm_init(1)
    params = bnjax.NormParams(None, None)
    # Each batch is built inside `stats_fn` from small arrays (its values and
    # a row of zeros that fixes the number of columns), so nothing large
    # crosses to the device.
    batches = [
        (jnp.full((rows, 1, 1), value, jnp.float32), jnp.zeros((1, columns, 1), jnp.float32))
        for (rows, columns), value in HUGE_BATCHES
    ]

    def stats_fn(s, batch):
        values, columns = batch
        return bnjax.batchnorm_apply(params, s, values + columns, True)[1]

    new_state = bnjax.precise_batch_stats(stats_fn, state, batches)

    counts = np.asarray([rows * columns for (rows, columns), _ in HUGE_BATCHES], np.float64)
    values = np.asarray([value for _, value in HUGE_BATCHES], np.float64)
    assert counts.sum() > 2**24
    mean = (counts * values).sum() / counts.sum()
    var = (counts * (values - mean) ** 2).sum() / counts.sum()
    np.testing.assert_allclose(new_state.mean, [mean], **PRECISE_TOL)
    np.testing.assert_allclose(new_state.var, [var], rtol=PRECISE_TOL["rtol"], atol=0)
    # float32 counts would visibly fail: the same merge with the counts
    # rounded to float32 gives twice the mean.
    rounded = counts.astype(np.float32).astype(np.float64)
    float32_mean = (rounded * values).sum() / rounded.sum()
    assert abs(float32_mean - mean) > 0.5 * abs(mean)
