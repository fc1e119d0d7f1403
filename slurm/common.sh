#!/usr/bin/env bash
# shellcheck shell=bash
# Shared body of the sbatch templates in this folder: each template holds its #SBATCH lines and
# its algorithm's flags, sources this file and calls `hpc_asgd_run FLAGS...`.
#
# Every knob is an environment variable, so `VAR=... sbatch slurm/x.sh` and
# `sbatch --export=ALL,VAR=... slurm/x.sh` both work; #SBATCH lines are overridden on the sbatch
# command line as usual (sbatch --nodes=8 --time=2:00:00 slurm/x.sh).
#
#   DATA_DIR      dataset folder (official files)            default: $HPC_ASGD_HOME/data
#   OUT_ROOT      parent of the per-job output folders       default: runs (relative to the job's
#                                                                      working directory)
#   OUT_DIR       this job's outputs                         default: $OUT_ROOT/<job name>-<job id>
#                 (array: <name>-<array id>_<task>); slurm.out in it links to the job's log
#   EPOCHS        --epochs (unset: the preset's / CLI's default)
#   DATASET MODEL ALGO and per-template knobs (PERIOD, GROUP_SIZE, ...): defaults in each template
#   PRESET        --config TOML read first (each template names its configs/ preset; the flags
#                 and knobs override it). A missing preset is skipped with a note; PRESET= (empty)
#                 means flags only.
#   WORKERS       --workers W: shared-memory worker processes per rank. Templates with workers
#                 default it to SLURM_CPUS_PER_TASK (one core each; 1 with RANKS_PER=gpu);
#                 the others leave it unset (the preset's or 1).
#   EXTRA_ARGS    appended last to `hpc-asgd train` (whitespace-separated; last flag wins)
#   VENV          a virtual environment to activate; unset: `hpc-asgd` from the exported PATH
#   LAUNCHER      srun (default) | mpirun: how the ranks start inside the allocation | none: one
#                 rank started directly (a quick try outside SLURM, or world size 1)
#   SRUN_MPI      srun --mpi=<plugin>                         default: pmix
#   SRUN_ARGS     more srun flags;  MPIRUN / MPIRUN_ARGS: the mpirun binary and more flags
#   RANKS_PER     node (default): one rank per task, --workers inside it, threads from
#                 cpus-per-task | gpu: one rank per GPU, each bound to the GPU of its local rank
#   GPU_BIND      with RANKS_PER=gpu: visible (default: CUDA_VISIBLE_DEVICES = the local rank's GPU;
#                 the program sees one device) | none (all GPUs visible; the program takes
#                 cuda:<local rank>). Never --gpus-per-task: its cgroup isolation breaks CUDA IPC.
#   OMP_NUM_THREADS  default: cpus-per-task / workers (at least 1)
#   FABRIC        auto (default: set nothing, report what is there) | ib | tcp. ib sets, unless
#                 already set: OMPI_MCA_pml=ucx, NCCL_IB_DISABLE=0; tcp sets NCCL_IB_DISABLE=1,
#                 OMPI_MCA_pml=ob1, OMPI_MCA_btl=tcp,self,sm, UCX_TLS=tcp,self,sm.
#                 Site knobs passed through when set: NCCL_IB_HCA (e.g. mlx5_0,mlx5_1),
#                 NCCL_SOCKET_IFNAME (e.g. ib0 or ^lo,docker), NCCL_IB_GID_INDEX, NCCL_DEBUG,
#                 UCX_NET_DEVICES (e.g. mlx5_0:1), UCX_TLS, OMPI_MCA_pml, OMPI_MCA_btl,
#                 OMPI_MCA_btl_tcp_if_include, PMIX_MCA_psec (native quiets a wheel-built
#                 Open MPI under Slurm's own PMIx).
#   MAX_RESTARTS  requeues after a checkpoint (exit 85) before giving up   default: 3
#   CHECKPOINT_EVERY, CHECKPOINT_MINUTES, CHECK_EVERY: passed as --checkpoint-every,
#                 --checkpoint-minutes, --check-every when set and the CLI has these flags
#
# Preemption and time limits: the templates ask for `--signal=B:USR1@120` and `--requeue`. The
# launcher runs in the background; the batch shell traps USR1 (from that signal, or from
# `scancel --signal=USR1 --batch JOBID`) and forwards it to the launcher, which forwards it to
# every rank (srun and Open MPI's mpirun both relay USR1). A rank that saves a checkpoint on USR1
# exits with status 85 ("checkpointed, please requeue"); on 85 this script runs
# `scontrol requeue` once for the job (array task: <array id>_<task id>) as long as
# SLURM_RESTART_COUNT < MAX_RESTARTS, and the requeued job resumes from
# $OUT_DIR/checkpoints (`--resume auto`, passed only when `hpc-asgd train --help` lists it).
#
# Exit status: the launcher's (0 on success; the CLI prints one `hpc-asgd: error: ...` line
# on failure); 85 when a checkpointed job could not be requeued.

# ------------------------------------------------------------------------------ rank wrapper
# `bash common.sh --rank-exec CMD...` runs once per rank (RANKS_PER=gpu): bind, then exec CMD so
# that signals from the launcher reach the rank itself.
if [ "${1:-}" = --rank-exec ]; then
  shift
  local_rank=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${PMI_LOCAL_RANK:-${SLURM_LOCALID:-0}}}}
  if [ "${GPU_BIND:-visible}" = visible ]; then
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then # the job's GPUs (--gres): pick ours among them
      IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
      export CUDA_VISIBLE_DEVICES=${gpus[local_rank % ${#gpus[@]}]}
    else
      export CUDA_VISIBLE_DEVICES=$local_rank
    fi
  fi
  exec "$@"
fi

HPC_ASGD_COMMON=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
: "${HPC_ASGD_HOME:=$(dirname "$(dirname "$HPC_ASGD_COMMON")")}"
export HPC_ASGD_HOME
HPC_ASGD_REQUEUE_EXIT=85

hpc_asgd_log() { printf '[hpc-asgd slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
hpc_asgd_die() {
  printf 'hpc-asgd: error: %s\n' "$*" >&2
  exit 1
}

# Default WORKERS of the templates with shared-memory workers: one per core of the rank
# (RANKS_PER=node), or 1 when each rank drives a GPU.
hpc_asgd_default_workers() {
  if [ "${RANKS_PER:-node}" = gpu ]; then
    echo 1
  else
    echo "${SLURM_CPUS_PER_TASK:-1}"
  fi
}

# The job id that scontrol requeue takes: array tasks are named <array job id>_<task id>.
hpc_asgd_job_ref() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "${SLURM_JOB_ID:-local}"
  fi
}

hpc_asgd_fabric() {
  local fabric=${FABRIC:-auto} ib=none
  if compgen -G '/sys/class/infiniband/*' >/dev/null; then
    ib=$(basename -a /sys/class/infiniband/* | paste -sd, -)
  fi
  case "$fabric" in
    auto) ;;
    ib)
      [ "$ib" = none ] && hpc_asgd_log "warning: FABRIC=ib but /sys/class/infiniband is empty"
      export OMPI_MCA_pml=${OMPI_MCA_pml:-ucx} NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
      ;;
    tcp)
      export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1} OMPI_MCA_pml=${OMPI_MCA_pml:-ob1}
      export OMPI_MCA_btl=${OMPI_MCA_btl:-tcp,self,sm} UCX_TLS=${UCX_TLS:-tcp,self,sm}
      ;;
    *) hpc_asgd_die "FABRIC must be auto, ib or tcp, not '$fabric'" ;;
  esac
  local v shown=""
  for v in NCCL_IB_HCA NCCL_SOCKET_IFNAME NCCL_IB_GID_INDEX NCCL_IB_DISABLE NCCL_DEBUG \
    UCX_NET_DEVICES UCX_TLS OMPI_MCA_pml OMPI_MCA_btl OMPI_MCA_btl_tcp_if_include PMIX_MCA_psec; do
    if [ -n "${!v:-}" ]; then
      export "${v?}"
      shown+=" $v=${!v}"
    fi
  done
  hpc_asgd_log "fabric: $fabric (InfiniBand devices: $ib)${shown:+;}$shown"
}

# hpc_asgd_run FLAGS...: the template's algorithm flags; everything else comes from the knobs.
hpc_asgd_run() {
  if [ -n "${VENV:-}" ]; then
    [ -f "$VENV/bin/activate" ] || hpc_asgd_die "VENV=$VENV has no bin/activate"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  command -v hpc-asgd >/dev/null \
    || hpc_asgd_die "hpc-asgd not on PATH ($PATH): set VENV=/path/to/venv or submit with it on PATH (sbatch exports PATH)"

  local job_ref ntasks cpus workers threads
  job_ref=$(hpc_asgd_job_ref)
  ntasks=${SLURM_NTASKS:-1}
  cpus=${SLURM_CPUS_PER_TASK:-1}
  workers=${WORKERS:-1}
  [[ "$workers" =~ ^[1-9][0-9]*$ ]] || hpc_asgd_die "WORKERS must be a positive integer, not '$workers'"
  threads=$((cpus / workers))
  [ "$threads" -ge 1 ] || threads=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
  export PYTHONUNBUFFERED=1

  DATA_DIR=${DATA_DIR:-$HPC_ASGD_HOME/data}
  if [ -z "${OUT_DIR:-}" ]; then
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
      OUT_DIR=${OUT_ROOT:-runs}/${SLURM_JOB_NAME:-hpc-asgd}-$job_ref
    else
      OUT_DIR=${OUT_ROOT:-runs}/${SLURM_JOB_NAME:-hpc-asgd}-${SLURM_JOB_ID:-local}
    fi
  fi
  mkdir -p "$OUT_DIR"
  OUT_DIR=$(cd "$OUT_DIR" && pwd) # absolute: the same folder for every rank and every restart
  export DATA_DIR OUT_DIR
  # The job's log (#SBATCH --output, which Slurm cannot put in a folder it would have to create)
  # gets a link in the job's folder.
  local log=""
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    log=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1) || true
  fi
  if [ -n "$log" ] && [ -f "$log" ]; then
    ln -sfn "$log" "$OUT_DIR/slurm.out"
  fi

  local args=(train)
  if [ -n "${PRESET:-}" ]; then
    if [ -f "$PRESET" ]; then
      args+=(--config "$PRESET")
    else
      hpc_asgd_log "preset $PRESET not found: using the template's flags alone"
    fi
  fi
  args+=("$@")
  [ -n "${DATASET:-}" ] && args+=(--dataset "$DATASET")
  [ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
  args+=(--data-dir "$DATA_DIR" --out "$OUT_DIR")
  [ -n "${EPOCHS:-}" ] && args+=(--epochs "$EPOCHS")
  [ -n "${WORKERS:-}" ] && args+=(--workers "$WORKERS")
  # Checkpoint/resume only when this version of the CLI has them (checked at run time).
  local help
  help=$(hpc-asgd train --help 2>/dev/null || true)
  if grep -q -- '--resume' <<<"$help"; then
    args+=(--resume auto --checkpoint-dir "$OUT_DIR/checkpoints")
  fi
  local knob flag
  for knob in CHECKPOINT_EVERY:--checkpoint-every CHECKPOINT_MINUTES:--checkpoint-minutes \
    CHECK_EVERY:--check-every; do
    flag=${knob#*:}
    knob=${knob%%:*}
    if [ -n "${!knob:-}" ] && grep -q -- "$flag" <<<"$help"; then
      args+=("$flag" "${!knob}")
    fi
  done
  local extra=()
  read -r -a extra <<<"${EXTRA_ARGS:-}"
  args+=("${extra[@]}")

  local exe=(hpc-asgd)
  case "${RANKS_PER:-node}" in
    node) ;;
    gpu) exe=(bash "$HPC_ASGD_COMMON" --rank-exec hpc-asgd) ;;
    *) hpc_asgd_die "RANKS_PER must be node or gpu, not '${RANKS_PER}'" ;;
  esac

  local launch=()
  case "${LAUNCHER:-srun}" in
    srun)
      # srun does not inherit --cpus-per-task from sbatch since Slurm 22.05: pass it on.
      launch=(srun --mpi="${SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --ntasks="$ntasks")
      [ -n "${SLURM_CPUS_PER_TASK:-}" ] && launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
      local more=()
      read -r -a more <<<"${SRUN_ARGS:-}"
      launch+=("${more[@]}")
      ;;
    mpirun)
      # Open MPI's mpirun reads the Slurm allocation itself (hosts and slots per node).
      launch=("${MPIRUN:-mpirun}" -n "$ntasks" --bind-to none)
      local more=()
      read -r -a more <<<"${MPIRUN_ARGS:-}"
      launch+=("${more[@]}")
      ;;
    none) [ "$ntasks" -eq 1 ] || hpc_asgd_die "LAUNCHER=none runs one rank, not $ntasks" ;;
    *) hpc_asgd_die "LAUNCHER must be srun, mpirun or none, not '${LAUNCHER}'" ;;
  esac

  hpc_asgd_fabric
  hpc_asgd_log "job $job_ref (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-$(hostname -s)}: $ntasks ranks, ${RANKS_PER:-node} mode, $cpus cpus/rank, workers ${WORKERS:-1}, OMP_NUM_THREADS=$OMP_NUM_THREADS, restart ${SLURM_RESTART_COUNT:-0}/${MAX_RESTARTS:-3}"
  hpc_asgd_log "out: $OUT_DIR  data: $DATA_DIR  cli: $(command -v hpc-asgd)"
  hpc_asgd_log "run: ${launch[*]} ${exe[*]} ${args[*]}"
  # A finished run is one whose rank 0 wrote summary.json: Open MPI's mpirun exits 0 after it
  # ended the ranks itself on losing a node's daemon, and a job must not read as COMPLETED then.
  HPC_ASGD_SUMMARY="$OUT_DIR/summary.json"
  HPC_ASGD_T0=$(date +%s)
  hpc_asgd_launch "${launch[@]}" "${exe[@]}" "${args[@]}"
}

# Runs the launcher in the background, forwards USR1/USR2/TERM/INT to it, requeues on exit 85.
hpc_asgd_launch() {
  local pid rc=0
  HPC_ASGD_SIGNALS=""
  "$@" &
  pid=$!
  # shellcheck disable=SC2064 # expand $pid now
  for sig in USR1 USR2 TERM INT; do
    trap "HPC_ASGD_SIGNALS+=' $sig'; hpc_asgd_log 'got SIG$sig: forwarding it to the launcher (pid $pid)'; kill -$sig $pid 2>/dev/null || true" "$sig"
  done
  # `wait` returns early when a trapped signal arrives: wait again until the launcher is gone
  # (a zombie still answers kill -0, so its status is never lost).
  while kill -0 "$pid" 2>/dev/null; do
    rc=0
    wait "$pid" || rc=$?
  done
  trap - USR1 USR2 TERM INT
  hpc_asgd_log "launcher exited with status $rc${HPC_ASGD_SIGNALS:+ (signals:$HPC_ASGD_SIGNALS)}"
  if [ "$rc" -eq 0 ] && [ -n "${HPC_ASGD_SUMMARY:-}" ] &&
    { [ ! -f "$HPC_ASGD_SUMMARY" ] || [ "$(stat -c %Y "$HPC_ASGD_SUMMARY")" -lt "$HPC_ASGD_T0" ]; }; then
    echo "hpc-asgd: error: the launcher exited with status 0 but this run wrote no $HPC_ASGD_SUMMARY: its ranks were ended without finishing (see the lines above)" >&2
    rc=1
  fi
  if [ "$rc" -eq "$HPC_ASGD_REQUEUE_EXIT" ]; then
    local restarts=${SLURM_RESTART_COUNT:-0} cap=${MAX_RESTARTS:-3} ref
    ref=$(hpc_asgd_job_ref)
    if [ -z "${SLURM_JOB_ID:-}" ]; then
      hpc_asgd_log "checkpointed (exit 85) outside Slurm: nothing to requeue"
    elif [ "$restarts" -ge "$cap" ]; then
      hpc_asgd_log "checkpointed (exit 85) but already restarted $restarts times (MAX_RESTARTS=$cap): not requeueing"
    else
      hpc_asgd_log "checkpointed (exit 85): scontrol requeue $ref (restart $((restarts + 1))/$cap)"
      if scontrol requeue "$ref"; then
        exit 0
      fi
      hpc_asgd_log "scontrol requeue $ref failed (was the job submitted with --requeue?)"
    fi
  fi
  exit "$rc"
}
