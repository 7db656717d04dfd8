"""The documentation site builds offline, renders in a browser, and has no broken internal links.

Builds the site once (``mkdocs build --strict``) into a temporary folder. The build executes the
notebooks through mkdocs-jupyter, the one execution of the tutorials per test run: a failing cell
fails the build, and the failure names the notebook, the cell and the error. Then:

- opens every built page in Debian's headless Chromium (``--dump-dom``, every host name unresolvable,
  a network log recorded) and checks that the page requested nothing from the network, that every
  formula was typeset by the MathJax shipped with the site (the concept pages must have formulas),
  that the home page and a tutorial rendered (for the tutorial, the plots its execution produced);
- checks every internal link and resource of every built page resolves to a file;
- checks no page or stylesheet refers to anything on the network (scripts, styles, fonts, images,
  frames).

Chromium is required (``scripts/setup.sh`` installs Debian's ``chromium``). Without it the browser
tests fail with that instruction instead of skipping.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOME = "index.html"
TUTORIAL = "tutorials/01_rotors/index.html"
MATH_PAGES = ["concepts/rotors/index.html", "concepts/codebooks/index.html", "concepts/qjl/index.html",
              "concepts/calibration/index.html", "format/index.html"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
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
        self.formulas = 0          # elements pymdownx.arithmatex marked for MathJax
        self.typeset = 0           # MathJax output containers
        self.math_errors: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag in RESOURCE_TAGS and RESOURCE_TAGS[tag] in a:
            self.resources.append(a[RESOURCE_TAGS[tag]])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if "arithmatex" in a.get("class", "").split():
            self.formulas += 1
        if tag == "mjx-container":
            self.typeset += 1
        if tag == "mjx-merror" or "data-mjx-error" in a:
            self.math_errors.append(a.get("data-mjx-error", tag))
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
    if proc.returncode != 0:
        pytest.fail(_build_failure(proc.stdout + proc.stderr), pytrace=False)
    return out


def _build_failure(log: str) -> str:
    """What a failed ``mkdocs build`` says: for a notebook, its name, the failing cell and the error."""
    log = ANSI.sub("", log)
    cell = re.search(r"Error reading page '([^']+\.ipynb)': (An error occurred while executing the following cell:"
                     r".*?)(?=^Traceback \(most recent call last\)|\Z)", log, re.S | re.M)
    if cell:
        page, error = cell.groups()
        source = f" (notebooks/{page.split('/', 1)[1]})" if page.startswith("tutorials/") else ""
        return (f"notebook {page}{source}: a cell failed while the docs build executed it\n"
                f"{error.strip()[-6000:]}")
    return f"mkdocs build --strict failed:\n{log[-8000:]}"


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


def _jupyter_options() -> dict:
    """The mkdocs-jupyter options of mkdocs.yml."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocs-jupyter" in plugin:
            return plugin["mkdocs-jupyter"]
    raise AssertionError("mkdocs.yml does not configure the mkdocs-jupyter plugin")


def test_a_failing_notebook_cell_fails_the_build_by_name(tmp_path: Path) -> None:
    """With the site's mkdocs-jupyter options, a notebook whose cell raises fails the build, and the
    failure names the notebook, shows the cell and the error (so a broken tutorial is found here)."""
    options = _jupyter_options()
    assert options.get("execute") is True and options.get("allow_errors") is False, (
        f"mkdocs.yml must execute the notebooks and fail on errors, got {options}")
    (tmp_path / "docs" / "tutorials").mkdir(parents=True)
    (tmp_path / "docs" / "index.md").write_text("# index\n", encoding="utf-8")
    cells = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
             for src in ("print('fine')", "ratio = 1 / 0")]
    notebook = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    (tmp_path / "docs" / "tutorials" / "broken.ipynb").write_text(json.dumps(notebook), encoding="utf-8")
    config = {"site_name": "t", "strict": True, "nav": [{"Home": "index.md"}, {"Broken": "tutorials/broken.ipynb"}],
              "plugins": [{"mkdocs-jupyter": options}]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=tmp_path, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "a notebook cell raising ZeroDivisionError did not fail the docs build"
    message = _build_failure(proc.stdout + proc.stderr)
    assert message.startswith("notebook tutorials/broken.ipynb (notebooks/broken.ipynb): a cell failed"), message
    assert "ratio = 1 / 0" in message and "ZeroDivisionError" in message, message


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium not found: the browser checks need Debian's headless Chromium "
                "(bash scripts/setup.sh installs it, or apt-get update && apt-get install -y chromium)")


def _page_requests(net_log: Path) -> list[str]:
    """URLs the page asked the network stack for, from Chromium's ``--log-net-log`` JSON.

    Requests a document makes carry its origin as initiator (``null`` for a file:// page); the
    browser's own background requests (updates, accounts) carry ``not an origin`` and are ignored.
    Files the page loads from disk (file://) never reach the network stack.
    """
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [event.get("params", {}) for event in log["events"] if event["type"] == start_job]
    return [params["url"] for params in starts if "url" in params and params.get("initiator") != "not an origin"]


def _render(page: Path, work: Path) -> tuple[_PageParser, list[str]]:
    """The DOM of ``page`` after Chromium loaded it and ran its scripts, with every host name
    unresolvable, and the network requests the page made."""
    net_log = work / "net-log.json"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={net_log}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"chromium failed on {page}:\n{proc.stderr[-4000:]}"
    return _parse(proc.stdout), _page_requests(net_log)


@pytest.fixture(scope="module")
def rendered(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[_PageParser, list[str]]]:
    """Every built page, rendered by Chromium: ``{site path: (DOM, network requests)}``."""
    work = tmp_path_factory.mktemp("chromium")
    return {page.relative_to(site).as_posix(): _render(page, work) for page in _pages(site)}


def test_the_network_check_sees_a_page_that_loads_from_the_network(tmp_path: Path) -> None:
    """The check below would catch a page that fetches a style, an image or data from another host."""
    page = tmp_path / "online.html"
    page.write_text('<html><head><title>t</title><link rel="stylesheet" href="https://cdn.example.org/a.css">'
                    '</head><body><img src="https://example.com/x.png"><script>'
                    'fetch("https://api.example.net/y").catch(() => {})</script></body></html>', encoding="utf-8")
    _, requests = _render(page, tmp_path)
    assert sorted(requests) == ["https://api.example.net/y", "https://cdn.example.org/a.css",
                                "https://example.com/x.png"], requests


def test_no_page_requests_anything_from_the_network_in_chromium(rendered) -> None:
    online = [f"{page}: {url}" for page, (_, requests) in rendered.items() for url in requests]
    assert not online, "pages requested resources from the network:\n" + "\n".join(online)


def test_every_formula_is_typeset_offline(rendered) -> None:
    """MathJax, shipped with the site, typeset every formula of every page (and the concept pages
    have formulas): each arithmatex element holds one MathJax container and none is an error."""
    for page in MATH_PAGES:
        assert page in rendered, f"{page} missing from the built site"
        assert rendered[page][0].formulas > 0, f"{page} has no formula marked for MathJax"
    for page, (dom, _) in rendered.items():
        assert not dom.math_errors, f"{page}: MathJax errors {dom.math_errors}"
        assert dom.typeset == dom.formulas, (
            f"{page}: {dom.formulas} formulas, {dom.typeset} typeset by MathJax (is the MathJax script in the site?)")


def test_home_page_renders_in_chromium(rendered) -> None:
    dom, _ = rendered[HOME]
    assert dom.title.strip(), "home page has an empty <title>"
    assert "rotorquant" in dom.title
    text = dom.body_text
    assert len(text) > 500, f"home page body text too short ({len(text)} chars): {text[:300]!r}"
    assert "KV cache" in text and "RotorQuant" in text


def test_tutorial_renders_in_chromium_with_its_plots(rendered) -> None:
    dom, _ = rendered[TUTORIAL]
    assert dom.title.strip(), "tutorial has an empty <title>"
    text = dom.body_text
    assert "Rotors in Cl(3,0)" in text
    assert len(text) > 3000, f"tutorial body text too short ({len(text)} chars)"
    # executed at build time: printed results and matplotlib figures are in the page
    assert "largest non-vector coefficient" in text, "tutorial shows no cell output: was it executed?"
    plots = [src for src in dom.images if src.startswith("data:image/png")]
    assert len(plots) >= 2, f"expected the tutorial's matplotlib figures, found {len(plots)} PNG images"
