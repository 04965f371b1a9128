#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extra, pinned by constraints.txt.
# torch is pinned to the CPU build 2.13.0 (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
echo "installed into .venv: $(.venv/bin/python -c 'import gptoss, jax, flax, jax2onnx, onnxruntime, transformers; print("jax", jax.__version__, "flax", flax.__version__, "jax2onnx", jax2onnx.__version__ if hasattr(jax2onnx, "__version__") else "?", "onnxruntime", onnxruntime.__version__, "transformers", transformers.__version__)')"
