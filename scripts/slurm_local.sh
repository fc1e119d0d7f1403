#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, from the distribution's packages (Debian/Ubuntu).
#
#   sudo bash scripts/slurm_local.sh start    # install if missing, configure, start, wait for idle
#   sudo bash scripts/slurm_local.sh status   # sinfo and the daemons' pids
#   sudo bash scripts/slurm_local.sh stop     # stop slurmd, slurmctld and munged
#
# `start` is idempotent: it installs slurmctld, slurmd, slurm-client and munge with apt-get when
# they are missing (non-interactive, works without a terminal), writes a munge key if there is
# none, writes $SLURM_CONF_DIR/slurm.conf for this host (one node with all its cores, a default
# partition with OverSubscribe=FORCE, no cgroups, no accounting daemon), starts the daemons
# without systemd, and waits until `sinfo` shows the node idle (resuming it when it comes up
# down or drained). A running cluster whose slurm.conf is unchanged is left alone; a changed one
# is restarted. Daemons run as root (SlurmUser=root): this is a test cluster, not a site set-up.
#
# Environment: SLURM_CONF_DIR (/etc/slurm), SLURM_STATE_DIR (/var/spool/slurm),
# SLURM_LOG_DIR (/var/log/slurm), SLURM_RUN_DIR (/run/slurm), SLURM_PARTITION (debug) (another
# SLURM_CONF_DIR needs SLURM_CONF=<dir>/slurm.conf exported for sbatch, srun and sinfo),
# SLURM_START_TIMEOUT (seconds to wait for an idle node, 90), SLURM_MPI_DEFAULT (pmix when the
# plugin is installed, else none), SLURM_SKIP_INSTALL=1 (never call apt-get), SLURM_LOCAL_FORCE=1
# (replace a slurm.conf that this script did not write; by default it refuses).
# `stop` stops the daemons only: processes of jobs still running are left alone.
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
STATE_DIR=${SLURM_STATE_DIR:-/var/spool/slurm}
LOG_DIR=${SLURM_LOG_DIR:-/var/log/slurm}
RUN_DIR=${SLURM_RUN_DIR:-/run/slurm}
PARTITION=${SLURM_PARTITION:-debug}
START_TIMEOUT=${SLURM_START_TIMEOUT:-90}
CONF="$CONF_DIR/slurm.conf"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
NODE=$(hostname -s)

say() { printf '[slurm_local] %s\n' "$*"; }
die() {
  printf '[slurm_local] error: %s\n' "$*" >&2
  exit 1
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages, writes $CONF and starts daemons); try: sudo bash $0 $1"
}

# ------------------------------------------------------------------------------------ install

have_all() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null
}

# The PMIx library that Slurm's mpi/pmix plugin dlopens (Debian: libpmix-dev's libpmix.so).
pmix_lib() {
  local f
  for f in /usr/lib/*/pmix*/lib/libpmix.so /usr/lib/*/libpmix.so /usr/lib64/libpmix.so \
    /usr/lib/libpmix.so; do
    if [ -e "$f" ]; then
      echo "$f"
      return 0
    fi
  done
  return 1
}

APT=(apt-get -q -y -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef
  -o Dpkg::Options::=--force-confold)
APT_UPDATED=0

apt_install() { # packages...
  export DEBIAN_FRONTEND=noninteractive
  if [ "$APT_UPDATED" = 0 ]; then
    # A fresh machine has empty package lists; an update is cheap compared with the install.
    "${APT[@]}" update </dev/null >>"$LOG_DIR/apt.log" 2>&1 || return 1
    APT_UPDATED=1
  fi
  "${APT[@]}" install "$@" </dev/null >>"$LOG_DIR/apt.log" 2>&1
}

install_packages() {
  local why="slurmctld/slurmd/sbatch/munged missing"
  if ! have_all; then
    [ "${SLURM_SKIP_INSTALL:-0}" = 1 ] && die "$why and SLURM_SKIP_INSTALL=1"
    command -v apt-get >/dev/null || die "$why and there is no apt-get to install them"
    say "installing slurmctld slurmd slurm-client munge with apt-get (a few minutes)"
    apt_install slurmctld slurmd slurm-client munge \
      || die "apt-get failed; see $LOG_DIR/apt.log: $(tail -n 3 "$LOG_DIR/apt.log" | tr '\n' ' ')"
    have_all || die "packages installed but $why from PATH ($PATH)"
  fi
  # Optional: srun --mpi=pmix needs the PMIx library itself, which the plugin package lacks.
  if ! pmix_lib >/dev/null && [ "${SLURM_SKIP_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null; then
    say "installing libpmix-dev (for srun --mpi=pmix)"
    apt_install libpmix-dev || say "libpmix-dev not installed (srun --mpi=pmix will be unavailable); see $LOG_DIR/apt.log"
  fi
}

# ------------------------------------------------------------------------------------- munge

munge_pid() {
  local pid
  pid=$(cat "$MUNGE_RUN/munged.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -e "/proc/$pid" ] && echo "$pid"
}

start_munge() {
  local owner=munge
  id munge >/dev/null 2>&1 || owner=root
  mkdir -p /etc/munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
  if [ ! -s "$MUNGE_KEY" ]; then
    say "writing a new munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chown "$owner:$owner" /etc/munge "$MUNGE_KEY" "$MUNGE_RUN" /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/log/munge
  chmod 0400 "$MUNGE_KEY"
  chmod 0755 "$MUNGE_RUN"
  if munge_pid >/dev/null; then
    return 0
  fi
  say "starting munged"
  rm -f "$MUNGE_RUN/munged.pid" "$MUNGE_RUN/munge.socket.2" "$MUNGE_RUN/munge.socket.2.lock"
  if [ "$owner" = munge ]; then
    runuser -u munge -- munged || die "munged failed to start; see /var/log/munge/munged.log"
  else
    munged --force || die "munged failed to start; see /var/log/munge/munged.log"
  fi
  local _
  for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "munged started but a munge/unmunge round trip fails; see /var/log/munge/munged.log"
}

# ----------------------------------------------------------------------------------- config

plugin_dir() {
  local d
  for d in /usr/lib/x86_64-linux-gnu/slurm-wlm /usr/lib/aarch64-linux-gnu/slurm-wlm \
    /usr/lib/slurm-wlm /usr/lib64/slurm /usr/lib/slurm; do
    if [ -e "$d/proctrack_linuxproc.so" ]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

write_conf() {
  local cpus mem_mb real_mem mpi plugins
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  # A bit below the machine's, so slurmd's own count (which excludes some kernel memory) is >= it.
  real_mem=$((mem_mb * 95 / 100))
  plugins=$(plugin_dir) || die "no SLURM plugin directory with proctrack_linuxproc.so found"
  if [ -n "${SLURM_MPI_DEFAULT:-}" ]; then
    mpi=$SLURM_MPI_DEFAULT
  elif [ -e "$plugins/mpi_pmix.so" ] && pmix_lib >/dev/null; then
    mpi=pmix
  else
    mpi=none
  fi
  mkdir -p "$CONF_DIR"
  local tmp
  tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
  cat >"$tmp" <<EOF
# Written by hpc_asgd's scripts/slurm_local.sh: one node, this machine, for tests and examples.
ClusterName=hpcasgd
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=30
CryptoType=crypto/munge
PluginDir=$plugins
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=$mpi
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt
ReturnToService=2
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (defaults: 60 and 30): requeued jobs restart promptly.
SchedulerParameters=sched_interval=5,bf_interval=5
# Finished jobs stay visible to scontrol for an hour (there is no accounting database).
MinJobAge=3600
KillWait=10
SlurmdTimeout=300
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
  chmod 0644 "$tmp"
  if [ -f "$CONF" ] && ! grep -q "^# Written by hpc_asgd's scripts/slurm_local.sh" "$CONF" \
    && [ "${SLURM_LOCAL_FORCE:-0}" != 1 ]; then
    rm -f "$tmp"
    die "$CONF exists and was not written by this script (a site configuration?): not touching it; move it away or set SLURM_LOCAL_FORCE=1"
  fi
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1 # unchanged
  fi
  mv "$tmp" "$CONF"
  say "wrote $CONF (node $NODE, $cpus CPUs, RealMemory=$real_mem MB, MpiDefault=$mpi)"
  return 0
}

# ---------------------------------------------------------------------------------- daemons

daemon_pid() { # slurmctld | slurmd
  local pid
  pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -e "/proc/$pid" ] && echo "$pid" # /proc: works for non-root status too
}

stop_pid() { # name pid
  local _
  kill "$2" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$2" 2>/dev/null || return 0
    sleep 0.1
  done
  say "$1 (pid $2) ignored SIGTERM for 10 s: killing it"
  kill -9 "$2" 2>/dev/null || true
}

stop_daemons() {
  local name pid
  for name in slurmd slurmctld; do
    if pid=$(daemon_pid "$name"); then
      say "stopping $name (pid $pid)"
      stop_pid "$name" "$pid"
    fi
    rm -f "$RUN_DIR/$name.pid"
  done
}

start_daemon() { # name
  local name=$1 pid _
  if daemon_pid "$name" >/dev/null; then
    return 0
  fi
  say "starting $name"
  # Daemonises by default; its log file records why it stopped, if it does.
  "$name" -f "$CONF" </dev/null || die "$name failed to start: $(tail -n 5 "$LOG_DIR/$name.log" 2>/dev/null | tr '\n' ' ')"
  for _ in $(seq 100); do
    if pid=$(daemon_pid "$name"); then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not stay up; last lines of $LOG_DIR/$name.log: $(tail -n 5 "$LOG_DIR/$name.log" 2>/dev/null | tr '\n' ' ')"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }

wait_idle() {
  local deadline state resumed=0
  deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(node_state || true)
    case "$state" in
      idle | mixed | allocated | idle+* | mixed+* | allocated+*)
        say "node $NODE is $state"
        return 0
        ;;
      down* | drain* | inval* | fail*)
        if [ "$resumed" -lt 3 ]; then
          say "node $NODE is $state: resuming it"
          scontrol update nodename="$NODE" state=resume 2>/dev/null || true
          resumed=$((resumed + 1))
        fi
        ;;
    esac
    sleep 1
  done
  sinfo -N -l >&2 || true
  die "node $NODE not idle after ${START_TIMEOUT} s (state '${state:-unknown}', reason: $(scontrol show node "$NODE" 2>/dev/null | sed -n 's/.*Reason=//p' | head -n 1)); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

# ----------------------------------------------------------------------------------- commands

cmd_start() {
  need_root start
  mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d"
  install_packages
  start_munge
  if write_conf; then
    # A new or changed configuration: daemons started with the old one must restart.
    stop_daemons
  fi
  start_daemon slurmctld
  start_daemon slurmd
  wait_idle
  say "ready: sbatch/srun/sinfo use $CONF (partition $PARTITION)"
}

cmd_stop() {
  need_root stop
  stop_daemons
  local pid
  if pid=$(munge_pid); then
    say "stopping munged (pid $pid)"
    stop_pid munged "$pid"
  fi
  say "stopped"
}

cmd_status() {
  local name pid rc=0
  for name in slurmctld slurmd; do
    if pid=$(daemon_pid "$name"); then
      say "$name running (pid $pid)"
    else
      say "$name not running"
      rc=3
    fi
  done
  if pid=$(munge_pid); then say "munged running (pid $pid)"; else
    say "munged not running"
    rc=3
  fi
  if command -v sinfo >/dev/null; then
    sinfo || rc=3
  else
    say "sinfo not installed (run: $0 start)"
    rc=3
  fi
  return "$rc"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart)
    cmd_stop
    cmd_start
    ;;
  *)
    echo "usage: $0 start|stop|status|restart" >&2
    exit 2
    ;;
esac
