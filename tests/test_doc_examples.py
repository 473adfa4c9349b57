"""The Python examples of the README and of the documentation pages run as written.

Every ```python block of README.md and of docs/**/*.md (the API reference in
docs/api/ is generated from docstrings and has none) runs on its own, in a
fresh namespace. Output and other illustrations use ```text fences.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
FILES = [ROOT / "README.md"] + sorted(
    p for p in DOCS.rglob("*.md") if DOCS / "api" not in p.parents
)
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def name(path):
    return str(path.relative_to(DOCS if DOCS in path.parents else ROOT))


BLOCKS = {name(p): BLOCK.findall(p.read_text()) for p in FILES}
# The README and the pages that teach with code; each must keep its examples.
WITH_EXAMPLES = (
    "README.md",
    "index.md",
    "normalizers.md",
    "masks.md",
    "scaling.md",
    "conditioning.md",
    "weight-normalizations.md",
    "tools.md",
    "frameworks.md",
)


@pytest.mark.parametrize("page", WITH_EXAMPLES)
def test_page_has_examples(page):
    assert BLOCKS.get(page), f"{page} has no ```python block"


def test_every_readme_example_is_kept():
    # The README had 17 examples before the documentation pages took them over.
    assert sum(len(blocks) for blocks in BLOCKS.values()) >= 17


CASES = [(page, i, source) for page, blocks in BLOCKS.items() for i, source in enumerate(blocks)]


@pytest.mark.parametrize(
    "page, source", [(p, s) for p, _, s in CASES], ids=[f"{p}-block{i}" for p, i, _ in CASES]
)
def test_example_runs(page, source):
    path = ROOT / page if page == "README.md" else DOCS / page
    exec(compile(source, str(path), "exec"), {"__name__": "doc_example"})
