#!/usr/bin/env bash
# The project's test command (README "Quick start"; CI runs exactly this through .ci/run):
# install, ruff, pytest: unit, oracle vs transformers, CLI, and the workflow (tests/test_workflow.py runs
# snakemake --lint, dry runs of promote_baseline2 and the toy DAG to promotion, with assertions).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export JAX_PLATFORMS=cpu

echo "== ruff"
ruff check .
ruff format --check .
echo "== pytest"
python -m pytest -q -p no:cacheprovider tests
