#!/usr/bin/env bash
# Copy what docs/results.md cites from the evidence run directory into docs/results/
# (the report, its JSON, its plots, the searches, the chain's report and manifest).
#   bash docs/results/collect.sh [runs/reproduce_evidence_cpu] [OUT (default: docs/results)]
set -euo pipefail
run="${1:-runs/reproduce_evidence_cpu}"
out="${2:-$(dirname "$0")}"
mkdir -p "$out/plots" "$out/chain/tune" "$out/chain/plots" "$out/chain/evaluation"
cp "$run/report.md" "$run/results.json" "$run/summary.json" "$out/"
cp "$run"/plots/*.png "$out/plots/"
for f in alpha_results.json alpha_results.md alpha_sweep.png best_alpha.json density.json density.md density.png; do
  if [ -f "$run/chain/tune/$f" ]; then cp "$run/chain/tune/$f" "$out/chain/tune/"; fi
done
cp "$run/chain/report.md" "$run/chain/manifest.json" "$run/chain/config.yaml" "$out/chain/"
cp "$run"/chain/plots/*.png "$out/chain/plots/"
cp "$run/chain/evaluation/evaluation.json" "$out/chain/evaluation/"
if [ -f "$run/chain/targets/targets.json" ]; then mkdir -p "$out/chain/targets" && cp "$run/chain/targets/targets.json" "$out/chain/targets/"; fi
