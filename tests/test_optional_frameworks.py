"""The core needs neither Flax nor Equinox; the adapters say which extra to install."""

import subprocess
import sys
import textwrap

# Runs in a fresh interpreter in which `flax` and `equinox` cannot be imported.
_WITHOUT_FRAMEWORKS = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("flax", "equinox"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    import jax.numpy as jnp
    import bnjax

    params, state = bnjax.batchnorm_init(3)
    y, state = bnjax.batchnorm_apply(params, state, jnp.arange(6.0).reshape(2, 3), True)
    print("core ran:", int(state.count), sorted({"flax", "equinox"} & set(sys.modules)))
    for adapter in ("nnx", "equinox"):
        try:
            __import__(f"bnjax.{adapter}")
        except ModuleNotFoundError as error:
            print(f"{adapter}:", error, "| missing:", error.name)
    """
)


def test_core_imports_and_runs_without_flax_or_equinox_and_adapters_name_their_extra():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FRAMEWORKS], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "core ran: 1 []", result.stdout
    assert lines[1] == "nnx: `bnjax.nnx` needs Flax: `pip install 'bnjax[flax]'`. | missing: flax"
    assert lines[2] == (
        "equinox: `bnjax.equinox` needs Equinox: `pip install 'bnjax[equinox]'`. | missing: equinox"
    )
