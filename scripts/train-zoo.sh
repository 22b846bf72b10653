#!/usr/bin/env bash
# Re-train every shipped model from its recipe and the data in ../shared/data (or $MEDSIGHT_DATA).
# Usage: scripts/train-zoo.sh [recipe-name ...]     (default: all recipes)
# Each model takes 3-20 minutes on 2 CPU cores; logs go to out/train-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=${MEDSIGHT_DATA:-../shared/data}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for r in recipes/*.json; do names+=("$(basename "$r" .json)"); done
fi
mkdir -p out/train-logs
for n in "${names[@]}"; do
  echo "== $n"
  .venv/bin/medsight train --recipe "recipes/$n.json" --data-root "$data_root" --out "medsight/zoo/$n" 2>&1 | tee "out/train-logs/$n.log"
done
