# The two commands of the README: `make demo` and `make test`. Each creates
# the virtual environment .venv and installs what it needs on first use, as
# do `make docs` and `make docs-check` for the documentation site.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Options for the script a target runs, e.g. `make demo ARGS=--full`.
ARGS ?=
SOURCES := pyproject.toml $(shell find bnjax -name '*.py' -o -name py.typed)

.PHONY: demo test lint typecheck bench docs docs-check dist clean

demo: $(VENV)/.deps-examples $(VENV)/.bnjax
	$(BIN)/python examples/study.py $(ARGS)

# The tests run in two processes (pytest-xdist; a file stays in one, so its
# module fixtures are built once), under line coverage of the installed
# bnjax, which is what the tests import: --cov
# names its folder in site-packages (the bare name `bnjax` would be taken for
# the source folder here, which the tests never run). Fails unless every line
# of bnjax/_src/stats.py ran.
test: $(VENV)/.deps-test $(VENV)/.bnjax lint typecheck
	$(BIN)/pytest -n 2 --dist loadfile --cov="$$($(BIN)/python -I -c 'import importlib.util as u; \
		print(u.find_spec("bnjax").submodule_search_locations[0])')" --cov-report=
	$(BIN)/coverage report --include='*/bnjax/_src/*'
	$(BIN)/coverage report --include='*/bnjax/_src/stats.py' --show-missing --fail-under=100

# Side-by-side timings (benchmarks/README.md); e.g. `make bench ARGS=--quick`.
bench: $(VENV)/.deps-benchmarks $(VENV)/.bnjax
	$(BIN)/python benchmarks/bench_norms.py $(ARGS)

# The documentation site in site/, from docs/ and the docstrings (mkdocs.yml).
# --strict makes every warning an error: a broken link or anchor, a page
# missing from the nav, a `:::` target that does not resolve, a missing
# snippet. NO_MKDOCS_2_WARNING silences the theme's banner about MkDocs 2.
docs: $(VENV)/.deps-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Loads pages of the built site in headless Chromium, as a reader would, and
# fails on console errors, failed requests, broken images and unrendered math
# (tools/check_docs_site.py); screenshots go to results/docs/. Needs Debian's
# chromium (`apt-get install chromium`), which .ci/run installs.
docs-check: docs $(VENV)/.deps-docs-check
	$(BIN)/python tools/check_docs_site.py

# The wheel and the sdist of a release, into dist/ (CHANGELOG.md says what is in it).
dist: $(VENV)/.deps-test
	$(BIN)/python -m build --outdir dist

lint: $(VENV)/.deps-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy --strict on bnjax/ ([tool.mypy] in pyproject.toml).
typecheck: $(VENV)/.deps-test
	$(BIN)/mypy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Third-party dependencies, reinstalled only when pyproject.toml changes.
$(VENV)/.deps-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check ".[$*]"
	touch $@

# bnjax itself, installed (not editable) so the tests see what users get.
# setuptools stages the package in build/, where a module deleted from bnjax/
# would otherwise live on and be installed again.
$(VENV)/.bnjax: $(SOURCES) | $(BIN)/python
	rm -rf build
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		--no-deps --force-reinstall .
	touch $@

clean:
	rm -rf $(VENV) build dist site *.egg-info
