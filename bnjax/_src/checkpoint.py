"""Saving and restoring whole model pytrees as `.npz` files, without pickle."""

import contextlib
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_FORMAT = "bnjax-checkpoint"
_VERSION = 1
_META = "__bnjax_checkpoint__"
# Dtypes `.npy` stores natively: bool, integers, floats, complex. Others (the
# ml_dtypes: bfloat16, float8, int4, ...) are stored as their raw bits.
_NATIVE_KINDS = "biufc"


def save_checkpoint(path: str | os.PathLike, tree: Any) -> None:
    """Saves every array of a pytree to an `.npz` file, bit for bit, without pickle.

    Each leaf is stored under its key path (`jax.tree_util.keystr`, e.g.
    `"['bn'].scale"`) with its shape and dtype. Dtypes numpy cannot store
    natively (bfloat16, float8, int4, ...) are stored as unsigned integers of
    their raw bits plus the dtype's name. `None` fields (e.g. `NormParams`
    with `use_bias=False`) are not leaves and store nothing. The file is
    written to a temporary file in the same directory and renamed over
    `path`, so `path` never holds a partial checkpoint.

    Args:
      path: the file to write, usually ending in `.npz` (used as given).
      tree: any pytree of arrays (JAX or numpy) and numbers, e.g.
        `{"params": params, "state": state}`.

    Raises:
      TypeError: a leaf is not numeric (e.g. a string or an object array).

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
      >>> params, state = bnjax.batchnorm_init(3, param_dtype=jnp.bfloat16)
      >>> bnjax.save_checkpoint(path, {"params": params, "state": state})
      >>> restored = bnjax.load_checkpoint(path, {"params": params, "state": state})
      >>> restored["params"].scale
      Array([1, 1, 1], dtype=bfloat16)
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, entries = {}, []
    for i, (key_path, leaf) in enumerate(leaves):
        key = jax.tree_util.keystr(key_path)
        value = np.asarray(jax.device_get(leaf))
        if value.dtype.kind in _NATIVE_KINDS:
            stored = value
        elif value.dtype.kind == "V" and not value.dtype.names and value.itemsize in (1, 2, 4, 8):
            stored = value.view(np.dtype(f"uint{8 * value.itemsize}"))  # the raw bits
        else:
            raise TypeError(f"`tree` must hold numeric arrays, got dtype {value.dtype} at {key}.")
        arrays[f"leaf_{i}"] = stored
        entries.append({"key": key, "dtype": value.dtype.name, "shape": list(value.shape)})
    meta = {"format": _FORMAT, "version": _VERSION, "leaves": entries}
    arrays[_META] = np.array(json.dumps(meta))
    _write_atomically(os.fspath(path), arrays)


def load_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Restores a checkpoint of `save_checkpoint` into the structure of `like`.

    The file is read with `allow_pickle=False`. Its key paths must be those of
    `like`'s leaves, and each array must have the shape and dtype of the
    matching leaf of `like`.

    Args:
      path: a file written by `save_checkpoint`.
      like: a pytree of the expected structure whose leaves give the shapes
        and dtypes: arrays, e.g. a freshly initialized model, or
        `jax.ShapeDtypeStruct`s from `jax.eval_shape`.

    Returns:
      A pytree of `like`'s structure with the saved values, bit for bit:
      JAX arrays where `like` has JAX arrays or `ShapeDtypeStruct`s (on the
      leaf's sharding when it has one), numpy arrays where it has numpy
      arrays, Python numbers where it has Python numbers.

    Raises:
      ValueError: the file is not a bnjax checkpoint or is damaged
        (truncated, corrupted, another format); its key paths differ from
        `like`'s, or a shape or dtype differs (the message names the first
        mismatch).

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
      >>> bnjax.save_checkpoint(path, {"w": jnp.arange(3.0)})
      >>> bnjax.load_checkpoint(path, {"w": jnp.zeros(3)})
      {'w': Array([0., 1., 2.], dtype=float32)}
    """
    path = os.fspath(path)
    saved = _read(path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = [jax.tree_util.keystr(key_path) for key_path, _ in flat]
    _check_keys(path, keys, list(saved))
    values = []
    for key, (_, leaf) in zip(keys, flat, strict=True):
        value = saved[key]
        shape, dtype = tuple(np.shape(leaf)), _dtype_of(leaf)
        if value.shape != shape or value.dtype != dtype:
            raise ValueError(
                f"Checkpoint {path} does not match `like` at {key}: `like` has shape "
                f"{shape} and dtype {dtype}, the checkpoint {value.shape} and {value.dtype}."
            )
        values.append(_like(value, leaf))
    return jax.tree.unflatten(treedef, values)


def _dtype_of(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def _like(value: np.ndarray, leaf: Any) -> Any:
    """`value` as the kind of object `leaf` is."""
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    if isinstance(leaf, bool | int | float | complex):
        return value.item()
    return value


def _check_keys(path: str, expected: list[str], found: list[str]) -> None:
    missing = [k for k in expected if k not in set(found)]
    if missing:
        raise ValueError(
            f"Checkpoint {path} does not match `like`: {missing[0]} is in `like` but not in "
            f"the checkpoint ({len(missing)} missing in all)."
        )
    extra = [k for k in found if k not in set(expected)]
    if extra:
        raise ValueError(
            f"Checkpoint {path} does not match `like`: {extra[0]} is in the checkpoint but "
            f"not in `like` ({len(extra)} unexpected in all)."
        )


def _read(path: str) -> dict[str, np.ndarray]:
    """Every array of the checkpoint by key path, in its dtype, checked against the metadata."""
    try:
        # numpy leaves the file open when given a path to a broken archive: open it here.
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with loaded as npz:
                return _arrays(npz)
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile, format, JSON and metadata errors alike
        raise ValueError(f"{path} is not a bnjax checkpoint or is damaged: {e!r}") from e


def _arrays(npz: Any) -> dict[str, np.ndarray]:
    """The arrays of an open archive by key path, checked against its metadata."""
    meta = json.loads(str(npz[_META][()]))
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"unknown format {meta.get('format')!r} {meta.get('version')!r}")
    saved = {}
    for i, entry in enumerate(meta["leaves"]):
        value = npz[f"leaf_{i}"]
        dtype = jnp.dtype(entry["dtype"])
        if dtype.kind not in _NATIVE_KINDS:
            value = value.view(dtype)
        if value.dtype != dtype or list(value.shape) != entry["shape"]:
            raise ValueError(
                f"{entry['key']} holds {value.dtype} {value.shape}, "
                f"its metadata says {dtype} {tuple(entry['shape'])}"
            )
        saved[entry["key"]] = value
    return saved


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
