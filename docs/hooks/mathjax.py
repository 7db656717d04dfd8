"""mkdocs hook: ship MathJax with the site, taken from an installed package, so formulas render offline.

The pages write formulas in LaTeX, which ``pymdownx.arithmatex`` (generic mode) wraps in
``<span class="arithmatex">\\(...\\)</span>`` and ``<div class="arithmatex">\\[...\\]</div>``.
MathJax typesets them in the browser. Its single-file SVG build, ``tex-svg-full.js`` (every TeX
extension and the glyph outlines, so it loads no other file), comes from the PyPI package
``django-static-mathjax`` (MathJax 3.2.2, Apache-2.0; the ``docs`` extra installs it) and is added to
the site's files at build time, with MathJax's license; ``docs/javascripts/mathjax-config.js``
configures it. Nothing is committed, and nothing is fetched at build or view time.
"""

from __future__ import annotations

from importlib import resources

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

# site path -> path inside the installed package ``mathjax`` (django-static-mathjax)
ASSETS = {
    "javascripts/mathjax/tex-svg-full.js": "static/mathjax/es5/tex-svg-full.js",
    "javascripts/mathjax/LICENSE": "static/mathjax/LICENSE",
}


def on_files(files: Files, config) -> Files:
    try:
        package = resources.files("mathjax")
    except ModuleNotFoundError:
        raise PluginError("MathJax not installed: the docs need the package django-static-mathjax "
                          "(pip install -e '.[docs]')") from None
    for site_path, package_path in ASSETS.items():
        source = package / package_path
        if not source.is_file():
            raise PluginError(f"MathJax asset {package_path} not found in {package}: "
                              "expected django-static-mathjax 3.2 (pip install -e '.[docs]')")
        files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files
