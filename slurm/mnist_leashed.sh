#!/usr/bin/env bash
#SBATCH --job-name=mnist-leashed
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Leashed-SGD (Bäckström et al., IPDPS 2021) on MNIST (IDX files under DATA_DIR), the paper's CNN:
# WORKERS shared-memory workers (default: one per core) updating one lock-free model inside a
# rank. One rank trains alone (ALGO=none); with several ranks the default ALGO is local-sgd
# (K-AVG every PERIOD = 16 steps across ranks).
# Knobs (environment or sbatch --export=ALL,VAR=...): see slurm/common.sh. Example:
#   EPOCHS=1 DATA_DIR=$PWD/data sbatch --nodes=2 slurm/mnist_leashed.sh
set -euo pipefail
# Find common.sh: $HPC_ASGD_HOME, next to this file (bash slurm/x.sh), next to the submitted
# file (Slurm runs a copy of it from its spool folder), or slurm/ under the submit directory.
for here in "${HPC_ASGD_HOME:-.}/slurm" "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/slurm" \
  "${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=\(/.*\)/[^/]*$|\1|p')}"; do
  [ -f "$here/common.sh" ] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$here/common.sh" || {
  echo "hpc-asgd: error: slurm/common.sh not found: set HPC_ASGD_HOME to the hpc_asgd checkout" >&2
  exit 1
}

: "${PRESET=$HPC_ASGD_HOME/configs/mnist_leashed.toml}" # PRESET= (empty): flags only
: "${DATASET:=mnist}" "${MODEL:=cnn}" "${UPDATE:=leashed}" "${PERIOD:=16}"
: "${WORKERS:=$(hpc_asgd_default_workers)}"
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  : "${ALGO:=local-sgd}"
else
  : "${ALGO:=none}"
fi
if [ "$ALGO" = none ]; then
  hpc_asgd_run --algo none --update "$UPDATE"
else
  hpc_asgd_run --algo "$ALGO" --period "$PERIOD" --update "$UPDATE"
fi
