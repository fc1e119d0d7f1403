#!/usr/bin/env bash
# The main job on the embedded default: 2 MPI ranks train an MLP on the offline digits set
# with K-AVG (local SGD) and print a short results table. Set-up included.
#
#   bash scripts/quickstart.sh [extra hpc-asgd train flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}

bash scripts/setup.sh
export PATH="$PWD/$VENV/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT_DIR:-runs/quickstart}

mpirun -n 2 --oversubscribe --bind-to none \
  hpc-asgd train --algo local-sgd --period 4 --dataset digits --model mlp \
  --epochs 8 --lr 0.05 --momentum 0.9 --out "$OUT" "$@"
echo "outputs: $OUT/summary.json $OUT/metrics.jsonl $OUT/model.pt"
