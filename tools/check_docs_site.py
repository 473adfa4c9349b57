"""Opens the built documentation in headless Chromium and fails on what a reader would see broken.

Serves `site/` on 127.0.0.1, loads every page of the site, saves a
full-page screenshot of three (the home page, a topic page with math and an
API page) under `results/docs/`, and exits non-zero, naming the page and the
problem, on: a console error or an uncaught exception; a failed request,
an HTTP status of 400 or more, or any request to another origin (the site
must work offline); an image that did not load; math that is not rendered
(an `.arithmatex` element without MathML in it, MathML the browser does not
lay out as math, TeX source left in the text); a topic page without any
rendered formula.

Needs Chromium (Debian's `/usr/bin/chromium`, or `$CHROMIUM`) and the
`playwright` package, which drives that browser and downloads none.

Usage: python tools/check_docs_site.py [--site site] [--out results/docs]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

# (screenshot name, path in the site, least number of formulas it must show);
# every other page of the site is checked too, without a screenshot.
SCREENSHOTS = [
    ("home", "index.html", 0),
    ("topic", "normalizers.html", 1),
    ("api", "api/normalizers.html", 0),
]

# Known to work headless as root on a machine without outside network: the
# background-networking flags stop Chromium's own calls to Google's services,
# which would otherwise fail at every start. Playwright adds `--headless` and
# a fresh, empty user data directory itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Runs in the page after it has loaded: the images, and the state of the math.
_INSPECT = """async () => {
  const images = [...document.images];
  for (const img of images) img.loading = "eager";
  await Promise.all(images.map((img) => img.decode().catch(() => {})));
  const brokenImages = images
    .filter((img) => !img.complete || img.naturalWidth === 0)
    .map((img) => img.getAttribute("src"));

  const maths = [...document.querySelectorAll("math")];
  const notLaidOut = maths.filter((m) => {
    const box = m.getBoundingClientRect();
    return !getComputedStyle(m).display.includes("math") || box.width === 0 || box.height === 0;
  }).length;
  const emptyArithmatex = [...document.querySelectorAll(".arithmatex")]
    .filter((el) => !el.querySelector("math"))
    .map((el) => el.textContent.trim().slice(0, 80));
  const untranslated = maths
    .flatMap((m) => [...m.querySelectorAll("mi, mo, mtext")])
    .map((el) => el.textContent)
    .filter((t) => /\\\\[A-Za-z]/.test(t));

  // TeX left in the prose: delimiters or commands outside code, scripts and MathML.
  const skip = "code, pre, script, style, textarea, math, kbd, samp";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const rawTex = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest(skip)) continue;
    const text = node.textContent;
    const hit = text.match(/\\\\[()\\[\\]]|\\$\\$|\\\\[A-Za-z]{2,}/);
    if (hit) rawTex.push(text.slice(Math.max(0, hit.index - 30), hit.index + 30).trim());
  }
  return {
    images: images.length,
    brokenImages,
    maths: maths.length,
    notLaidOut,
    emptyArithmatex,
    untranslated,
    rawTex,
  };
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def _serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        sys.exit(f"no Chromium at {path}: apt-get install chromium, or set CHROMIUM")
    return path


def _pages(site: Path) -> list[tuple[str, int, Path | None]]:
    """(path, least formulas, screenshot or None) for every page of the site."""
    shots = {path: (min_maths, name) for name, path, min_maths in SCREENSHOTS}
    paths = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    missing = set(shots) - set(paths)
    if missing:
        sys.exit(f"pages to screenshot not in {site}: {sorted(missing)}")
    return [(p, *shots.get(p, (0, None))) for p in paths]


def _check_page(browser, origin: str, path: str, min_maths: int, shot: Path | None) -> list[str]:
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def route(route):
        url = route.request.url
        if url.startswith(origin + "/"):
            route.continue_()
        else:
            problems.append(f"request to another origin: {url}")
            route.abort()

    def console(msg):
        if msg.type == "error":
            problems.append(f"console error: {msg.text}")

    def request_failed(request):
        if request.url.startswith(origin + "/"):
            problems.append(f"request failed: {request.url} ({request.failure})")

    def response(res):
        if res.status >= 400:
            problems.append(f"HTTP {res.status}: {res.url}")

    page.route("**/*", route)
    page.on("console", console)
    page.on("pageerror", lambda err: problems.append(f"uncaught exception: {err}"))
    page.on("requestfailed", request_failed)
    page.on("response", response)

    page.goto(f"{origin}/{path}", wait_until="networkidle")
    found = page.evaluate(_INSPECT)
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
    page.close()

    problems += [f"image did not load: {src}" for src in found["brokenImages"]]
    problems += [f"formula not converted to MathML: {t!r}" for t in found["emptyArithmatex"]]
    problems += [f"TeX command left inside MathML: {t!r}" for t in found["untranslated"]]
    problems += [f"raw TeX in the text: {t!r}" for t in found["rawTex"]]
    if found["notLaidOut"]:
        problems.append(f"{found['notLaidOut']} of {found['maths']} formulas not laid out as math")
    if found["maths"] < min_maths:
        problems.append(f"{found['maths']} rendered formulas, expected at least {min_maths}")
    print(
        f"{path}: {found['maths']} formulas, {found['images']} images, "
        f"{len(problems)} problems" + (f"; screenshot {shot}" if shot else "")
    )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=Path("site"))
    parser.add_argument("--out", type=Path, default=Path("results/docs"))
    args = parser.parse_args()
    if not (args.site / "index.html").is_file():
        sys.exit(f"{args.site}/index.html not found: build the site first (make docs)")
    args.out.mkdir(parents=True, exist_ok=True)

    pages = _pages(args.site)
    server = _serve(args.site)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    failed = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
            for path, min_maths, name in pages:
                shot = args.out / f"{name}.png" if name else None
                problems = _check_page(browser, origin, path, min_maths, shot)
                for problem in problems:
                    print(f"  FAIL {path}: {problem}")
                failed += bool(problems)
            browser.close()
    finally:
        server.shutdown()
    print(f"docs-check: {len(pages) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
