#!/usr/bin/env bash
#SBATCH --job-name=cifar10-local-async
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Non-blocking in-place averaging ("Local SGD meets asynchrony"; "Scaling the Wild") on CIFAR-10,
# ResNet-20: one rank per node with WORKERS shared-memory workers (default: one per core), the
# rank's main process averages every PERIOD (16) node-level steps while the workers keep going.
# The preset supplies the schedule; the flags below and the knobs override it.
# Knobs (environment or sbatch --export=ALL,VAR=...): see slurm/common.sh. Example:
#   EPOCHS=1 DATA_DIR=$PWD/data sbatch --nodes=2 slurm/cifar10_local_async.sh
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

: "${PRESET=$HPC_ASGD_HOME/configs/cifar10_resnet20_local_async.toml}" # PRESET= (empty): flags only
: "${ALGO:=local-async}" "${DATASET:=cifar10}" "${MODEL:=resnet20}" "${PERIOD:=16}"
: "${WORKERS:=$(hpc_asgd_default_workers)}"
hpc_asgd_run --algo "$ALGO" --period "$PERIOD"
