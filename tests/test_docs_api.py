"""The API reference (docs/api/*.md) has an entry for every public name, and only for those."""

import importlib
import pathlib
import re

import pytest

API_PAGES = sorted((pathlib.Path(__file__).parent.parent / "docs" / "api").glob("*.md"))
MODULES = ["bnjax", "bnjax.convert", "bnjax.nnx", "bnjax.equinox"]
# mkdocstrings' directive: `::: bnjax.layernorm_apply` at the start of a line.
DIRECTIVES = [
    m.group(1)
    for page in API_PAGES
    for m in re.finditer(r"^:::\s+(\S+)", page.read_text(), flags=re.MULTILINE)
]


def _public_names(module_name):
    module = importlib.import_module(module_name)
    return {f"{module_name}.{name}" for name in module.__all__}


def test_the_api_pages_exist():
    assert len(API_PAGES) >= 2 and DIRECTIVES


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_an_api_entry(module_name):
    missing = sorted(_public_names(module_name) - set(DIRECTIVES))
    assert not missing, f"not in any docs/api page: {missing}"


def test_every_api_entry_is_a_public_name_documented_once():
    public = set(MODULES).union(*(_public_names(m) for m in MODULES))
    unknown = sorted(set(DIRECTIVES) - public)
    assert not unknown, f"docs/api entries that are not public names: {unknown}"
    repeated = sorted({d for d in DIRECTIVES if DIRECTIVES.count(d) > 1})
    assert not repeated, f"docs/api entries that appear twice: {repeated}"
