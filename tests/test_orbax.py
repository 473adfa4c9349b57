"""Checkpoints through orbax-checkpoint: bnjax's pytrees round-trip bit-exact.

bnjax ships no file format: its params and states are NamedTuples, which
orbax's `StandardCheckpointer` saves and restores against an abstract target
as they are. These tests pin down what a user relies on: types, `None`
fields, dtypes and shardings survive, and a target that does not match the
checkpoint is an error, not a silent reshape.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax


def _model():
    """Params and state with NormParams/BatchStats, None fields, bf16, int32 and a NaN."""
    bn_params, bn_state = bnjax.batchnorm_init(4)
    key = jax.random.key(0)
    return {
        "params": {
            "dense": {
                "kernel": jax.random.normal(key, (3, 4)),
                "bias": jnp.arange(4.0).at[1].set(jnp.nan),
            },
            "bn": bn_params._replace(scale=jnp.linspace(-1.0, 1.0, 4)),
            "ln": bnjax.layernorm_init((4,), use_bias=False, param_dtype=jnp.bfloat16),
            "embed": jax.random.normal(key, (5, 2), jnp.bfloat16),
        },
        "state": {"bn": bn_state._replace(count=jnp.int32(7)), "step": jnp.int32(-3)},
    }


def _abstract(tree):
    """The restore target: shape, dtype and sharding of every array of `tree`."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _save(path, tree):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)


def _restore(path, target):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def _assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(g, jax.Array)
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        bits = np.dtype(f"uint{8 * w.dtype.itemsize}")
        np.testing.assert_array_equal(np.asarray(g).view(bits), np.asarray(w).view(bits))


def test_round_trip_keeps_types_none_fields_dtypes_and_bits(tmp_path):
    tree = _model()
    _save(tmp_path / "ckpt", tree)

    restored = _restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))

    _assert_bit_equal(restored, tree)
    assert type(restored["params"]["bn"]) is bnjax.NormParams
    assert type(restored["state"]["bn"]) is bnjax.BatchStats
    assert restored["params"]["ln"].bias is None


def test_round_trip_keeps_shardings_over_eight_devices(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    params, state = bnjax.batchnorm_init(16)
    tree = {
        "params": jax.device_put(params, NamedSharding(mesh, P())),
        "state": jax.device_put(state, NamedSharding(mesh, P())),
        "kernel": jax.device_put(
            jnp.arange(32.0 * 16).reshape(32, 16), NamedSharding(mesh, P("data"))
        ),
    }
    _save(tmp_path / "ckpt", tree)

    restored = _restore(tmp_path / "ckpt", _abstract(tree))

    _assert_bit_equal(restored, tree)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert got.sharding == want.sharding


# Run in a process of its own: when a read fails, orbax abandons the other
# reads in flight, and their coroutines, collected later, report to
# sys.unraisablehook in whatever test then runs.
SHAPE_MISMATCH = """
import sys
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
import bnjax

tree = {"kernel": jnp.ones((3, 4)), "bn": bnjax.batchnorm_init(4)[0]}
with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(sys.argv[1], tree)
target = jax.eval_shape(lambda: tree)
target["kernel"] = jax.ShapeDtypeStruct((3, 5), jnp.float32)
try:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.restore(sys.argv[1], target)
except ValueError as err:
    print(err)
"""


def test_a_target_of_another_shape_is_an_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SHAPE_MISMATCH, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        check=True,
    )

    assert "(3, 5) is not compatible with the stored shape: (3, 4)" in result.stdout, result


def test_a_target_of_another_structure_is_an_error(tmp_path):
    tree = _model()
    _save(tmp_path / "ckpt", tree)
    target = jax.eval_shape(lambda: tree)
    del target["params"]["ln"]

    with pytest.raises(ValueError, match="tree structures do not match"):
        _restore(tmp_path / "ckpt", target)


def test_switching_a_field_on_is_an_error(tmp_path):
    # The checkpoint's `bias` is None; a target with a bias is a different model.
    tree = _model()
    _save(tmp_path / "ckpt", tree)
    target = jax.eval_shape(lambda: tree)
    target["params"]["ln"] = jax.eval_shape(
        lambda: bnjax.layernorm_init(4, param_dtype=jnp.bfloat16)
    )

    with pytest.raises(ValueError, match=r"\('params', 'ln', 'bias'\) not found"):
        _restore(tmp_path / "ckpt", target)
