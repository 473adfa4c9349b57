"""Checkpoints: bit-exact round trips without pickle, and clear errors."""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def _model():
    """Params and state with NormParams/BatchStats, None fields, bf16 and int32."""
    bn_params, bn_state = bnjax.batchnorm_init(4)
    key = jax.random.key(0)
    return {
        "params": {
            "dense": {"kernel": jax.random.normal(key, (3, 4)), "bias": jnp.arange(4.0)},
            "bn": bn_params._replace(scale=jnp.linspace(-1.0, 1.0, 4)),
            "ln": bnjax.layernorm_init((4,), use_bias=False, param_dtype=jnp.bfloat16),
            "embed": jax.random.normal(key, (5, 2), jnp.bfloat16),
        },
        "state": {"bn": bn_state._replace(count=jnp.int32(7)), "step": jnp.int32(-3)},
    }


def _bits(a):
    a = np.asarray(a)
    return a.view(np.dtype(f"uint{8 * a.itemsize}"))


def test_round_trip_is_bit_exact_with_structure_dtypes_and_none_fields(tmp_path):
    tree = _model()
    tree["params"]["dense"]["bias"] = tree["params"]["dense"]["bias"].at[1].set(jnp.nan)
    path = tmp_path / "model.npz"

    bnjax.save_checkpoint(path, tree)
    restored = bnjax.load_checkpoint(path, jax.tree.map(jnp.zeros_like, tree))

    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert restored["params"]["ln"].bias is None
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert isinstance(got, jax.Array)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_file_holds_no_pickle_and_bfloat16_as_raw_bits(tmp_path):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, _model())

    with np.load(path, allow_pickle=False) as npz:
        dtypes = {npz[name].dtype for name in npz.files}
    assert np.dtype(np.uint16) in dtypes
    assert all(d.kind in "biufU" for d in dtypes)


def test_restores_into_shapes_from_eval_shape_and_numpy_leaves(tmp_path):
    tree = _model()
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, tree)

    abstract = bnjax.load_checkpoint(path, jax.eval_shape(lambda: tree))
    as_numpy = bnjax.load_checkpoint(path, jax.tree.map(np.asarray, tree))

    for got, want in zip(jax.tree.leaves(abstract), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(want))
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(as_numpy))


def test_save_replaces_an_existing_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, {"w": jnp.zeros(3)})
    bnjax.save_checkpoint(path, {"w": jnp.ones(3)})

    np.testing.assert_array_equal(bnjax.load_checkpoint(path, {"w": jnp.zeros(3)})["w"], 1.0)
    assert os.listdir(tmp_path) == ["model.npz"]


@pytest.mark.parametrize("keep", [0.5, 0.9], ids=["half", "most"])
def test_truncated_file_is_a_clear_value_error(tmp_path, keep):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, _model())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(ValueError, match="is not a bnjax checkpoint or is damaged"):
        bnjax.load_checkpoint(path, _model())


@pytest.mark.parametrize(
    "content",
    [b"garbage" * 100, b"", np.lib.format.MAGIC_PREFIX + b"\x01\x00garbage"],
    ids=["garbage", "empty", "npy-magic"],
)
def test_garbage_file_is_a_clear_value_error(tmp_path, content):
    path = tmp_path / "model.npz"
    path.write_bytes(content)

    with pytest.raises(ValueError, match="is not a bnjax checkpoint or is damaged"):
        bnjax.load_checkpoint(path, _model())


def test_corrupted_array_bytes_are_a_clear_value_error(tmp_path):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, {"w": jnp.arange(1000.0)})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xff" * 8  # inside the array: the zip CRC no longer matches
    path.write_bytes(bytes(data))

    with pytest.raises(ValueError, match="is not a bnjax checkpoint or is damaged"):
        bnjax.load_checkpoint(path, {"w": jnp.zeros(1000)})


def test_other_npz_file_is_a_clear_value_error(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, w=np.zeros(3))

    with pytest.raises(ValueError, match="is not a bnjax checkpoint or is damaged"):
        bnjax.load_checkpoint(path, {"w": jnp.zeros(3)})


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, {"a": jnp.zeros(3)})

    with pytest.raises(ValueError, match=r"\['b'\] is in `like` but not in the checkpoint"):
        bnjax.load_checkpoint(path, {"a": jnp.zeros(3), "b": jnp.zeros(3)})


def test_unexpected_key_is_named(tmp_path):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, {"a": jnp.zeros(3), "b": bnjax.layernorm_init(3)})

    with pytest.raises(ValueError, match=r"\['b'\]\.bias is in the checkpoint but not in `like`"):
        bnjax.load_checkpoint(
            path, {"a": jnp.zeros(3), "b": bnjax.layernorm_init(3, use_bias=False)}
        )


@pytest.mark.parametrize(
    "like, what",
    [
        ({"w": jnp.zeros(4)}, r"shape \(4,\)"),
        ({"w": jnp.zeros(3, jnp.bfloat16)}, r"shape \(3,\) and dtype bfloat16"),
    ],
    ids=["shape", "dtype"],
)
def test_shape_or_dtype_mismatch_is_named(tmp_path, like, what):
    path = tmp_path / "model.npz"
    bnjax.save_checkpoint(path, {"w": jnp.zeros(3)})

    with pytest.raises(ValueError, match=rf"at \['w'\]: `like` has {what}"):
        bnjax.load_checkpoint(path, like)


def test_non_numeric_leaf_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="numeric"):
        bnjax.save_checkpoint(tmp_path / "model.npz", {"name": np.array(["a", "b"])})
    assert not os.listdir(tmp_path)


def test_zip_member_names_are_indices_not_key_paths(tmp_path):
    """Key paths may hold any character; they live in the metadata, not in file names."""
    path = tmp_path / "model.npz"
    tree = {"a/b": jnp.zeros(2), "../c": jnp.ones(2)}
    bnjax.save_checkpoint(path, tree)

    with zipfile.ZipFile(path) as archive:
        assert all("/" not in name for name in archive.namelist())
    restored = bnjax.load_checkpoint(path, tree)
    np.testing.assert_array_equal(restored["../c"], 1.0)
