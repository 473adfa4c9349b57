"""Inputs and parameters shared by the tests: seeded, non-trivial, in one place."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

import bnjax


def random_params(rng, shape, dtype=np.float32):
    """Affine parameters of `shape` that make every derivative count.

    |scale| in [0.5, 2] of either sign (away from 1), bias O(1) (away from 0).
    """
    scale = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    bias = rng.normal(size=shape)
    return bnjax.NormParams(jnp.asarray(scale, dtype), jnp.asarray(bias, dtype))


def perturbed_params(params, seed=0):
    """`params` (any `NormParams`, `None` fields kept) moved away from their initial values."""
    keys = iter(jax.random.split(jax.random.key(seed), 2))

    def perturb(p):
        return None if p is None else p + 0.3 * jax.random.normal(next(keys), p.shape, p.dtype)

    return bnjax.NormParams(scale=perturb(params.scale), bias=perturb(params.bias))


def random_input(rng, shape, dtype=np.float32):
    """Normal values with mean 0.7 and std 1.5: O(1), and not centred."""
    return (rng.normal(size=shape) * 1.5 + 0.7).astype(dtype)


def random_examples(rng, shape, dtype=np.float32):
    """Values with a different mean and spread per example (axis 0), O(1) overall."""
    per_example = (shape[0],) + (1,) * (len(shape) - 1)
    spread = rng.uniform(0.5, 2.0, per_example)
    offset = rng.normal(size=per_example)
    return (rng.normal(size=shape) * spread + offset).astype(dtype)


def random_mask(rng, shape, fraction=0.6):
    """A boolean mask of `shape`, True with probability `fraction`.

    Its first entry is False (so a statistic that wrongly starts from the
    first entry shows) and its last two are True (so at least two count).
    """
    mask = rng.random(shape) < fraction
    mask.flat[0] = False
    mask.flat[-2:] = True
    return mask


def f64(a):
    """`a` as a float64 numpy array, for the references; None stays None."""
    return None if a is None else np.asarray(a, np.float64)


def equations(jaxpr):
    """Every equation of `jaxpr`, and recursively those of its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += equations(sub)
    return found
