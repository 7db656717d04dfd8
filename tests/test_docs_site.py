"""The documentation site builds offline, renders in a browser, and has no broken internal links.

Builds the site once (``mkdocs build --strict``, which also executes the notebooks through
mkdocs-jupyter) into a temporary folder, then:

- opens the home page and a tutorial in Debian's headless Chromium (``--dump-dom``) with every host
  name unresolvable, and checks they rendered: a title, body text, and for the tutorial the plots
  its execution produced;
- checks every internal link and resource of every built page resolves to a file;
- checks no page loads anything from the network (scripts, styles, fonts, images, frames).

Chromium is required: ``apt-get install chromium`` (``scripts/test.sh`` installs it). Without it
the browser test fails with that instruction instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOME = "index.html"
TUTORIAL = "tutorials/01_rotors/index.html"
RESOURCE_TAGS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src", "audio": "src",
                 "embed": "src", "link": "href"}


class _PageParser(HTMLParser):
    """Collects links, resource URLs, the title and the visible text of one HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.resources: list[str] = []
        self.title = ""
        self.text: list[str] = []
        self.images: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag in RESOURCE_TAGS and RESOURCE_TAGS[tag] in a:
            self.resources.append(a[RESOURCE_TAGS[tag]])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag not in {"meta", "link", "img", "br", "hr", "input", "source", "embed", "wbr", "col", "area", "base"}:
            self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if "title" in self._stack and "svg" not in self._stack:
            self.title += data
        elif not {"script", "style", "svg", "noscript"} & set(self._stack):
            self.text.append(data)

    @property
    def body_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def _parse(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    return parser


def _is_external(url: str) -> bool:
    return bool(re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", url, re.I))


def _is_internal(url: str) -> bool:
    return bool(url) and not _is_external(url) and not re.match(r"^(#|mailto:|data:|javascript:|tel:)", url, re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built with ``mkdocs build --strict`` into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["NO_MKDOCS_2_WARNING"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


def _pages(site: Path) -> list[Path]:
    pages = sorted(site.rglob("*.html"))
    assert pages, f"no HTML pages in {site}"
    return pages


def _target(site: Path, page: Path, url: str) -> Path:
    """The file an internal URL of ``page`` points to (``dir/`` means ``dir/index.html``)."""
    path = unquote(urlsplit(url).path)
    if not path:
        return page
    target = (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    if path.endswith("/") or target.is_dir():
        target = target / "index.html"
    return target.resolve()


def test_notebooks_are_stored_without_outputs() -> None:
    """The convention for notebooks in git: outputs stripped (the site and CI execute them)."""
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 4, f"expected the four tutorials in notebooks/, found {[n.name for n in notebooks]}"
    for nb in notebooks:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        stored = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
        assert not stored, f"{nb.name}: cells {stored} are stored with outputs; strip them (jupyter nbconvert --clear-output)"


def test_every_page_of_the_nav_is_built(site: Path) -> None:
    for page in [HOME, TUTORIAL, "getting-started/index.html", "format/index.html", "api/index.html",
                 "tiers/numpy/index.html", "benchmarks/index.html", "tutorials/04_end_to_end/index.html"]:
        assert (site / page).is_file(), f"{page} missing from the built site"


def test_internal_links_resolve(site: Path) -> None:
    broken = []
    for page in _pages(site):
        parsed = _parse(page.read_text(encoding="utf-8"))
        for url in parsed.links + parsed.resources:
            if _is_internal(url) and not _target(site, page, url).exists():
                broken.append(f"{page.relative_to(site)}: {url}")
    assert not broken, "broken internal links:\n" + "\n".join(broken)


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    external = []
    for page in _pages(site):
        parsed = _parse(page.read_text(encoding="utf-8"))
        external += [f"{page.relative_to(site)}: {url}" for url in parsed.resources if _is_external(url)]
    for sheet in site.rglob("*.css"):
        for url in re.findall(r"url\(\s*['\"]?([^'\")\s]+)", sheet.read_text(encoding="utf-8", errors="replace")):
            if _is_external(url):
                external.append(f"{sheet.relative_to(site)}: {url}")
    assert not external, "pages load resources from the network:\n" + "\n".join(external)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium not found: the browser check needs Debian's headless Chromium "
                "(apt-get update && apt-get install -y chromium; scripts/test.sh installs it)")


def _render(page: Path) -> _PageParser:
    """The DOM of ``page`` after Chromium loaded it, with every host name unresolvable."""
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"chromium failed on {page}:\n{proc.stderr[-4000:]}"
    return _parse(proc.stdout)


def test_home_page_renders_in_chromium(site: Path) -> None:
    dom = _render(site / HOME)
    assert dom.title.strip(), "home page has an empty <title>"
    assert "rotorquant" in dom.title
    text = dom.body_text
    assert len(text) > 500, f"home page body text too short ({len(text)} chars): {text[:300]!r}"
    assert "KV cache" in text and "RotorQuant" in text


def test_tutorial_renders_in_chromium_with_its_plots(site: Path) -> None:
    dom = _render(site / TUTORIAL)
    assert dom.title.strip(), "tutorial has an empty <title>"
    text = dom.body_text
    assert "Rotors in Cl(3,0)" in text
    assert len(text) > 3000, f"tutorial body text too short ({len(text)} chars)"
    # executed at build time: printed results and matplotlib figures are in the page
    assert "largest non-vector coefficient" in text, "tutorial shows no cell output: was it executed?"
    plots = [src for src in dom.images if src.startswith("data:image/png")]
    assert len(plots) >= 2, f"expected the tutorial's matplotlib figures, found {len(plots)} PNG images"
