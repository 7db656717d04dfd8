#!/usr/bin/env bash
# Run every check: the unit and agreement suites (Triton tier under the interpreter),
# the notebooks, the docs build and its browser check.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q --nbmake --nbmake-timeout=300 tests notebooks "$@"
