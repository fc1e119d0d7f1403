#!/usr/bin/env bash
#SBATCH --job-name=cifar10-hier-avg
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=2
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Hier-AVG (Zhou & Cong, arXiv 1903.05133) on CIFAR-10, ResNet-20: groups of GROUP_SIZE ranks
# (0 = the ranks of one node) average every LOCAL_PERIOD (K1 = 4) steps, all ranks every
# K1 * GLOBAL_PERIOD (K2 = 8) steps. GROUP_SIZE must divide the number of ranks.
# Knobs (environment or sbatch --export=ALL,VAR=...): see slurm/common.sh. Example:
#   EPOCHS=1 DATA_DIR=$PWD/data sbatch --nodes=2 slurm/cifar10_hier_avg.sh
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

: "${PRESET=$HPC_ASGD_HOME/configs/cifar10_hier_avg.toml}" # PRESET= (empty): flags only
: "${ALGO:=hier-avg}" "${DATASET:=cifar10}" "${MODEL:=resnet20}"
: "${GROUP_SIZE:=0}" "${LOCAL_PERIOD:=4}" "${GLOBAL_PERIOD:=8}"
hpc_asgd_run --algo "$ALGO" --group-size "$GROUP_SIZE" --local-period "$LOCAL_PERIOD" \
  --global-period "$GLOBAL_PERIOD"
