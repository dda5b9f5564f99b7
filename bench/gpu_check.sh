#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): one command, under 8 minutes on one H200.
# Needs the project's environment with a CUDA build of torch 2.13 (`make install` on a GPU machine
# with PyPI gets one: PyPI's Linux torch wheel is the CUDA build). Never needed by the tests.
#   bench/gpu_check.sh                  # build a ~0.6B Llama, write the table into docs/performance.md
#   bench/gpu_check.sh --model DIR      # use a local model folder instead
#   bench/gpu_check.sh --device cpu --small --no-doc   # plumbing check without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec timeout 900 "$PY" -m bench.gpu_check "$@"
