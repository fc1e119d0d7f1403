#!/usr/bin/env bash
#SBATCH --job-name=cifar100-lasgd
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# LASGD (Avidor et al., arXiv 2203.13085) on CIFAR-100, ResNet-20: local steps never wait; a
# model snapshot is averaged in the background every PERIOD (8) steps, one round in flight.
# Knobs (environment or sbatch --export=ALL,VAR=...): see slurm/common.sh. Example:
#   EPOCHS=1 DATA_DIR=$PWD/data sbatch --nodes=2 slurm/cifar100_lasgd.sh
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

: "${PRESET=$HPC_ASGD_HOME/configs/cifar100_lasgd.toml}" # PRESET= (empty): flags only
: "${ALGO:=lasgd}" "${DATASET:=cifar100}" "${MODEL:=resnet20}" "${PERIOD:=8}"
hpc_asgd_run --algo "$ALGO" --period "$PERIOD"
