// MathJax settings, read by javascripts/mathjax/tex-svg-full.js (copied into the site by
// docs/hooks/mathjax.py). Only the spans and divs that pymdownx.arithmatex marks are typeset.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  svg: { fontCache: "global" },
};
