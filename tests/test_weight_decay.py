"""`weight_decay_mask` spares normalization parameters from optax's weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax

LR, DECAY = 0.1, 0.5


def _nested_model():
    return {
        "encoder": {
            "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
            "bn": bnjax.batchnorm_init(4)[0],
        },
        "ln": bnjax.layernorm_init((4,), use_bias=False),
        "head": [jnp.full((4, 2), 2.0), bnjax.rmsnorm_init(2)],
    }


def _scanned_model(num_layers=3):
    """Layers stacked for `lax.scan`: every leaf has a leading axis of layers."""
    params = {
        "kernel": jnp.full((num_layers, 4, 4), 2.0),
        "norm": jax.vmap(lambda _: bnjax.batchnorm_init(4)[0])(jnp.arange(num_layers)),
    }
    assert params["norm"].scale.shape == (num_layers, 4)
    return params


def test_mask_is_false_inside_normparams_and_true_elsewhere():
    mask = bnjax.weight_decay_mask(_nested_model())

    assert mask == {
        "encoder": {
            "dense": {"kernel": True, "bias": True},
            "bn": bnjax.NormParams(scale=False, bias=False),
        },
        "ln": bnjax.NormParams(scale=False, bias=None),
        "head": [True, bnjax.NormParams(scale=False, bias=None)],
    }


def test_mask_of_layers_stacked_for_scan_finds_norms_by_type():
    mask = bnjax.weight_decay_mask(_scanned_model())

    assert mask == {"kernel": True, "norm": bnjax.NormParams(scale=False, bias=False)}


@pytest.mark.parametrize("as_callable", [True, False], ids=["callable", "tree"])
@pytest.mark.parametrize("make", [_nested_model, _scanned_model], ids=["nested", "scanned"])
def test_adamw_with_mask_decays_everything_but_norm_params(make, as_callable):
    params = make()
    mask = bnjax.weight_decay_mask if as_callable else bnjax.weight_decay_mask(params)
    optimizer = optax.adamw(LR, weight_decay=DECAY, mask=mask)
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)
    new_params = optax.apply_updates(params, updates)

    # With zero gradients Adam's step is 0; decoupled decay multiplies a
    # decayed parameter by 1 - LR * DECAY (one float32 rounding), and leaves
    # an undecayed one exactly as it was.
    expected_mask = bnjax.weight_decay_mask(params)
    leaves = zip(
        jax.tree.leaves(new_params),
        jax.tree.leaves(params),
        jax.tree.leaves(expected_mask),
        strict=True,
    )
    for new, old, decayed in leaves:
        if decayed:
            np.testing.assert_allclose(new, np.asarray(old) * (1 - LR * DECAY), rtol=1e-6)
        else:
            np.testing.assert_array_equal(new, old)
    assert not all(jax.tree.leaves(expected_mask)) and any(jax.tree.leaves(expected_mask))
