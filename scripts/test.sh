#!/usr/bin/env bash
# The project's test command (README "Quick start"; CI runs exactly this through .ci/run):
# install, lint, pytest (unit, oracle vs transformers, CLI, workflow), snakemake lint + dry run + toy DAG.
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
echo "== snakemake --lint"
snakemake --lint
echo "== dry run of the default target (baseline2 from the hub; nothing is downloaded)"
snakemake -n promote_baseline2 --quiet rules
echo "== toy DAG from an empty results folder to promotion"
rm -rf results/toy results/promoted/toy
snakemake --cores 2 promote_baseline2 --configfile config/toy.yaml
python - <<'PY'
import json
m = json.load(open("results/promoted/toy/baseline2/manifest.json"))
print("promoted", m["tag"], [f["name"] for f in m["files"]], "worst canonical logits diff",
      m["worst_differences"]["canonical/logits"]["max_abs_diff"])
PY
