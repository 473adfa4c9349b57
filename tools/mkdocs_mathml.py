"""MkDocs hook: turns the TeX that pymdownx.arithmatex marks into MathML at build time.

arithmatex (generic mode) finds `$...$` and `$$...$$` and leaves the TeX in
`<span class="arithmatex">\\(...\\)</span>` and `<div class="arithmatex">\\[...\\]</div>`;
this hook replaces the TeX inside with latex2mathml's MathML, which browsers
render without any script or font of the site's own. TeX that latex2mathml
cannot translate fails the build, naming the page and the formula, instead of
showing a reader a half-converted formula.
"""

from __future__ import annotations

import html
import re

import latex2mathml.converter
from mkdocs.exceptions import PluginError

_ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', re.DOTALL
)
_DELIMITERS = {"span": (r"\(", r"\)"), "div": (r"\[", r"\]")}
# latex2mathml copies a command it does not know into an <mi> as it is, and an
# `&` outside the environments it aligns (e.g. inside `aligned`) as a bare <mi>.
_UNTRANSLATED = re.compile(r"<m[io][^>]*>(\\[A-Za-z]+|&amp;|&)</m[io]>")
# `aligned` is the usual way to align lines inside `$$`; latex2mathml aligns
# the same rows when they are written as `align*`.
_ALIGNED = re.compile(r"\\(begin|end)\{aligned\}")


def _to_mathml(tex: str, display: str, page: str) -> str:
    tex = _ALIGNED.sub(r"\\\1{align*}", tex)
    try:
        mathml = latex2mathml.converter.convert(tex, display=display)
    except Exception as err:
        raise PluginError(f"{page}: cannot convert the formula {tex!r} to MathML: {err!r}") from err
    bad = _UNTRANSLATED.search(mathml)
    if bad:
        raise PluginError(
            f"{page}: latex2mathml does not translate {html.unescape(bad.group(1))!r} "
            f"in the formula {tex!r}; write it with the commands it knows"
        )
    return mathml


def on_page_content(content: str, page, config, files) -> str:
    def replace(match: re.Match[str]) -> str:
        tag = match.group("tag")
        opening, closing = _DELIMITERS[tag]
        tex = html.unescape(match.group("tex")).strip()
        if not (tex.startswith(opening) and tex.endswith(closing)):
            raise PluginError(f"{page.file.src_path}: unexpected arithmatex output {tex!r}")
        tex = tex[len(opening) : -len(closing)].strip()
        display = "inline" if tag == "span" else "block"
        mathml = _to_mathml(tex, display, page.file.src_path)
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return _ARITHMATEX.sub(replace, content)
