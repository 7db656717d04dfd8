#!/usr/bin/env bash
# Run every check: the unit and agreement suites (Triton tier under the interpreter), the vLLM plugin
# against the real vLLM package, and the docs build with its browser check. The docs build executes
# each notebook once (mkdocs-jupyter); tests/test_docs_site.py fails on any failing cell.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q tests "$@"
