"""The release: `python -m build` makes a wheel and an sdist, and the wheel
installs into a fresh virtual environment with nothing but JAX.

One module fixture builds and installs once (about a minute, most of it
installing jax and jaxlib); the tests then read what it made.
"""

import json
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).parent.parent
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]

# Run inside the fresh environment: a BatchNorm training step under jit,
# checked against the definition, then a report of what is installed.
SMOKE_TEST = """
import importlib.metadata as md
import json

import jax
import jax.numpy as jnp

import bnjax

params, state = bnjax.batchnorm_init(3)
x = jnp.arange(12.0).reshape(4, 3)
y, state = jax.jit(bnjax.batchnorm_apply, static_argnums=3)(params, state, x, True)
expected = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
assert jnp.allclose(y, expected, atol=1e-6), y
assert int(state.count) == 1
print(json.dumps({
    "version": bnjax.__version__,
    "file": bnjax.__file__,
    "installed": sorted(d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()),
    "requires": {
        d.metadata["Name"].lower().replace("_", "-"): d.requires or [] for d in md.distributions()
    },
}))
"""


def _run(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    _run(sys.executable, "-m", "build", "--outdir", str(out / "dist"), str(ROOT))
    (wheel,) = (out / "dist").glob("*.whl")
    (sdist,) = (out / "dist").glob("*.tar.gz")
    # No pip inside the new environment: the running one installs into it.
    venv = out / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel))
    report = json.loads(_run(str(python), "-c", SMOKE_TEST, cwd=out).stdout)
    return {"wheel": wheel, "sdist": sdist, "venv": venv, "report": report}


def test_wheel_and_sdist_are_named_by_the_version(release):
    assert release["wheel"].name == f"bnjax-{VERSION}-py3-none-any.whl"
    assert release["sdist"].name == f"bnjax-{VERSION}.tar.gz"


def test_wheel_holds_the_package_its_type_marker_and_the_license(release):
    names = zipfile.ZipFile(release["wheel"]).namelist()
    assert "bnjax/py.typed" in names
    assert "bnjax/_src/stats.py" in names
    assert f"bnjax-{VERSION}.dist-info/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)


def test_sdist_holds_the_whole_test_suite_and_the_changelog(release):
    with tarfile.open(release["sdist"]) as sdist:
        names = {n.removeprefix(f"bnjax-{VERSION}/") for n in sdist.getnames()}
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert tests <= names, sorted(tests - names)
    assert {"CHANGELOG.md", "LICENSE", "README.md", "pyproject.toml"} <= names


def test_installed_wheel_runs_a_batchnorm_from_site_packages(release):
    report = release["report"]
    assert report["version"] == VERSION
    assert pathlib.Path(report["file"]).is_relative_to(release["venv"])


def test_installed_wheel_brings_only_jax_and_what_jax_needs(release):
    requires = release["report"]["requires"]
    reachable, todo = set(), ["bnjax"]
    while todo:
        name = todo.pop()
        if name in reachable:
            continue
        reachable.add(name)
        for requirement in requires.get(name, []):
            if "extra ==" not in requirement:
                todo.append(re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower().replace("_", "-"))
    installed = set(release["report"]["installed"])
    assert installed <= reachable, sorted(installed - reachable)
    assert {"jax", "jaxlib"} <= installed
    assert not installed & {"flax", "equinox", "optax", "orbax-checkpoint", "torch"}


def test_changelog_names_the_version_as_its_newest_entry():
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings and headings[0] == VERSION, headings[:1]
