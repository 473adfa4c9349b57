"""Griffe extension: reads bnjax's `Example:` sections as doctest examples.

Griffe's Google parser takes only the plural `Examples:` for a section of
`>>>` code and renders any other title as an admonition, where the doctest
lines would come out as nested block quotes. bnjax's docstrings use the
singular, so it is renamed before the docstrings are parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
