#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment: install this checkout's gptoss package (and its
# `gptoss` console script) without touching the conda-installed dependencies.
set -euo pipefail
repo="$(cd "$(dirname "$0")" && pwd)"
python -m pip install --no-deps --no-build-isolation -e "$repo"
