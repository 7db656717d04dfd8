#!/usr/bin/env bash
# Set up from nothing: a virtual environment in .venv with rotorquant and every extra.
# torch is pinned first so pip takes the CPU build on disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
