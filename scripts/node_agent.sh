#!/usr/bin/env bash
# Open MPI's launch agent for the emulated nodes of scripts/slurm_local.sh: where mpirun would
# `ssh NODE COMMAND`, this enters NODE's namespaces (network, hostname, /tmp) and runs COMMAND
# there, so bare-metal mpirun spans the emulated nodes without sshd. Root only (nsenter).
#
#   bash scripts/slurm_local.sh start --nodes 2
#   bash scripts/slurm_local.sh hostfile >hosts
#   mpirun --hostfile hosts --prtemca plm_ssh_agent "$PWD/scripts/node_agent.sh" -n 4 hpc-asgd train ...
#
# Called as `node_agent.sh [ssh options] NODE COMMAND...` (Open MPI passes the command as one
# shell string, as it would to ssh). The environment of mpirun comes along, as with a shared home.
set -euo pipefail
RUN_DIR=${SLURM_RUN_DIR:-/run/slurm}

while [ $# -gt 0 ]; do
  case "$1" in
    -[lpioF]) shift 2 ;; # ssh options that take a value
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || {
  echo "usage: $0 NODE COMMAND..." >&2
  exit 2
}
node=${1%%.*}
shift
pid=$(cat "$RUN_DIR/node-$node.pid" 2>/dev/null || true)
if [ -z "$pid" ] || [ ! -e "/proc/$pid" ]; then
  echo "node_agent: $node is not an emulated node of scripts/slurm_local.sh (no $RUN_DIR/node-$node.pid)" >&2
  exit 255 # what ssh returns when it cannot reach the host
fi
exec nsenter -t "$pid" --net --uts --mount -- /bin/sh -c "$*"
