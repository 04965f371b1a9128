#!/usr/bin/env bash
# Create .venv (if missing, or made by another python3: scripts/venv.sh) and install the project with its test extra,
# pinned by constraints.txt; then import it (a failed import fails the script).
# torch is pinned to the CPU build 2.13.0 (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh ensure .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
bash scripts/venv.sh check .venv
