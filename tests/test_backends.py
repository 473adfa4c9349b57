"""What each compiler backend is given: barriers only where they were measured to pay.

`bnjax/_src/stats_cpu.py` holds XLA:CPU's forms of the shifted sums and the
normalization coefficients (optimization barriers, a JVP rule), selected by
`jax.lax.platform_dependent`. Every other backend must get the plain form,
which its compiler is free to fuse. `jax.export` lowers for a platform
without needing its hardware, so both choices are checked here on any
machine.
"""

import jax
import jax.numpy as jnp
import pytest

import bnjax

X = jnp.ones((8, 4, 4, 6))


def _train_step(x):
    """BatchNorm forward and backward, GroupNorm and LayerNorm forward: every statistics path."""
    params, state = bnjax.batchnorm_init(6)

    def loss(x):
        y, _ = bnjax.batchnorm_apply(params, state, x, True)
        y = bnjax.groupnorm_apply(bnjax.groupnorm_init(6), y, num_groups=3)
        return jnp.sum(bnjax.layernorm_apply(bnjax.layernorm_init(6), y) ** 2)

    return jax.grad(loss)(x)


def _lowered_text(platform):
    exported = jax.export.export(jax.jit(_train_step), platforms=[platform])(X)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_accelerators_get_no_optimization_barrier(platform):
    assert "stablehlo.optimization_barrier" not in _lowered_text(platform)


def test_cpu_gets_the_barriers_of_stats_cpu():
    assert "stablehlo.optimization_barrier" in _lowered_text("cpu")


def test_both_forms_compute_the_same_thing():
    """The plain form, forced on the CPU, equals the CPU form to rounding."""
    from bnjax._src import stats, stats_cpu

    x = jax.random.normal(jax.random.key(0), (64, 5)) * 3 + 100
    shift = x[:1]
    plain = jax.jit(lambda x: stats.shifted_sums(x, shift, mask=None, axes=(0,)))(x)
    cpu = jax.jit(lambda x: stats_cpu.shifted_sums(x, shift, mask=None, axes=(0,)))(x)
    for a, b in zip(plain, cpu, strict=True):
        assert jnp.allclose(a, b, rtol=1e-6, atol=1e-4)
