#!/usr/bin/env bash
# A real SLURM cluster on this machine, from the distribution's packages (Debian/Ubuntu): one
# node (this host), or N emulated nodes with real TCP between them.
#
#   sudo bash scripts/slurm_local.sh start [--nodes N]  # install if missing, configure, start, wait for idle
#   sudo bash scripts/slurm_local.sh status             # daemons, nodes and sinfo
#   sudo bash scripts/slurm_local.sh stop               # stop everything start made
#   bash scripts/slurm_local.sh hostfile                # an Open MPI hostfile of the emulated nodes
#   sudo bash scripts/slurm_local.sh exec NODE CMD...   # run CMD on emulated node NODE (a "login")
#
# --nodes N (N > 1): each node is a network namespace with its own address on one private bridge
# (hpcasgd0, $SLURM_LOCAL_NET.0/24: the bridge is .1, node i is .(10+i)), its own hostname
# (UTS namespace: node1 ... nodeN, also written to /etc/hosts) and its own /tmp and /dev/shm
# (mount namespace; the checkout is bound back in when it lies under /tmp, and so is every folder
# in SLURM_LOCAL_SHARED), running its own slurmd; slurmctld and munged are shared and stay in this
# host's namespaces. A small "holder" process owns each node's namespaces; slurmd, `exec` and the
# mpirun launch agent scripts/node_agent.sh enter them through it (nsenter), never through
# `ip netns exec`, which remounts /sys and hides the cgroup tree slurmd needs. Traffic between
# nodes stays on the bridge: the nodes have no default route. `tc qdisc ... tbf` on a node's
# link (hv-nodeI) caps its bandwidth. Every node gets all of this machine's cores (CPUs=`nproc
# --all`, so OMP_NUM_THREADS does not shrink it): jobs oversubscribe them.
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
# SLURM_LOCAL_NET (10.77.0), SLURM_LOCAL_SHARED (colon-separated folders under /tmp that every
# node sees, beside the checkout). `stop` stops the daemons; with emulated nodes it also kills
# every process left in a node and removes the namespaces, links, bridge and /etc/hosts lines.
# A job that can never run (more CPUs than the partition has) is refused at submission
# (EnforcePartLimits=ALL) instead of pending forever.
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
NODE=$(hostname -s) # the controller's host (and the only node without --nodes)
NET=${SLURM_LOCAL_NET:-10.77.0}
BRIDGE=hpcasgd0
NODES_FILE=$RUN_DIR/nodes # the emulated nodes that start made, a name a line
HOSTS_MARK="# hpc_asgd slurm_local node"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NNODES=1

say() { printf '[slurm_local] %s\n' "$*"; }
die() {
  printf '[slurm_local] error: %s\n' "$*" >&2
  exit 1
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages, writes $CONF, starts daemons and makes network namespaces); try: sudo bash $0 $1"
}

# ------------------------------------------------------------------------------------ install

have_all() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null \
    && command -v ip >/dev/null && command -v nsenter >/dev/null
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
  local why="slurmctld/slurmd/sbatch/munged/ip/nsenter missing"
  if ! have_all; then
    [ "${SLURM_SKIP_INSTALL:-0}" = 1 ] && die "$why and SLURM_SKIP_INSTALL=1"
    command -v apt-get >/dev/null || die "$why and there is no apt-get to install them"
    say "installing slurmctld slurmd slurm-client munge iproute2 with apt-get (a few minutes)"
    apt_install slurmctld slurmd slurm-client munge iproute2 util-linux \
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

node_names() { # N -> node1 ... nodeN (none for N = 1: the node is this host)
  [ "$1" -gt 1 ] || return 0
  seq -f 'node%g' "$1"
}

node_addr() { echo "$NET.$((10 + ${1#node}))"; }

write_conf() {
  local cpus mem_mb real_mem mpi plugins nodes ctl_addr n
  # The hardware's count: plain nproc honours OMP_NUM_THREADS, and a node registered with fewer
  # CPUs than a job asks for would leave that job pending for ever.
  cpus=$(nproc --all)
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
  nodes=$(node_names "$NNODES")
  ctl_addr=127.0.0.1
  [ -n "$nodes" ] && ctl_addr=$NET.1
  mkdir -p "$CONF_DIR"
  local tmp
  tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
  {
    cat <<CONF
# Written by hpc_asgd's scripts/slurm_local.sh: $NNODES node(s) on this machine, for tests and examples.
ClusterName=hpcasgd
SlurmctldHost=$NODE($ctl_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=30
CryptoType=crypto/munge
PluginDir=$plugins
StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
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
# A job that no partition can ever hold is refused by sbatch at once, not left pending.
EnforcePartLimits=ALL
# Finished jobs stay visible to scontrol for an hour (there is no accounting database).
MinJobAge=3600
KillWait=10
InactiveLimit=0
Waittime=0
CONF
    if [ -z "$nodes" ]; then
      cat <<CONF
SlurmdTimeout=300
SlurmdSpoolDir=$STATE_DIR/d
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
    else
      # A node whose slurmd stops answering is marked down after SlurmdTimeout: short, so that
      # a lost node is seen within a test's time (a requeued job then avoids it).
      cat <<CONF
SlurmdTimeout=15
SlurmdSpoolDir=$STATE_DIR/d/%n
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
CONF
      for n in $nodes; do
        echo "NodeName=$n NodeAddr=$(node_addr "$n") CPUs=$cpus RealMemory=$real_mem State=UNKNOWN"
      done
      echo "PartitionName=$PARTITION Nodes=node[1-$NNODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE"
    fi
  } >"$tmp"
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
  say "wrote $CONF ($(echo "${nodes:-$NODE}" | paste -sd, -): $cpus CPUs each, RealMemory=$real_mem MB, MpiDefault=$mpi)"
  return 0
}

# ---------------------------------------------------------------------------------- daemons

pid_of() { # pid file -> a live pid
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -e "/proc/$pid" ] && echo "$pid" # /proc: works for non-root status too
}

daemon_pid() { pid_of "$RUN_DIR/$1.pid"; } # slurmctld | slurmd | slurmd-NODE

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

start_daemon() { # name [node]: slurmctld, slurmd (this host) or slurmd inside an emulated node
  local name=$1 node=${2:-} id=$1 pid _ log
  [ -n "$node" ] && id=$name-$node
  log=$LOG_DIR/$id.log
  if daemon_pid "$id" >/dev/null; then
    return 0
  fi
  say "starting $id"
  # Daemonises by default; its log file records why it stopped, if it does.
  if [ -n "$node" ]; then
    in_node "$node" "$name" -f "$CONF" -N "$node" </dev/null \
      || die "$id failed to start: $(tail -n 5 "$log" 2>/dev/null | tr '\n' ' ')"
  else
    "$name" -f "$CONF" </dev/null || die "$id failed to start: $(tail -n 5 "$log" 2>/dev/null | tr '\n' ' ')"
  fi
  for _ in $(seq 100); do
    if pid=$(daemon_pid "$id"); then
      return 0
    fi
    sleep 0.1
  done
  die "$id did not stay up; last lines of $log: $(tail -n 5 "$log" 2>/dev/null | tr '\n' ' ')"
}

# ------------------------------------------------------------------------------ emulated nodes

current_nodes() { cat "$NODES_FILE" 2>/dev/null || true; }

holder_pid() { pid_of "$RUN_DIR/node-$1.pid"; }

in_node() { # node cmd...: run cmd in the node's network, UTS and mount namespaces
  local pid
  pid=$(holder_pid "$1") || die "emulated node $1 is not running (start the nodes: $0 start --nodes N)"
  shift
  # --wd: this folder as the node sees it (the same path: only /tmp and /dev/shm differ)
  nsenter -t "$pid" --net --uts --mount --wd="$PWD" -- "$@"
}

# What a node sees of this host's /tmp: the checkout when it lies there (a CI clone), and the
# folders of SLURM_LOCAL_SHARED. Everything else under /tmp is the node's own.
shared_dirs() {
  local d
  case "$REPO/" in /tmp/*) echo "$REPO" ;; esac
  tr ':' '\n' <<<"${SLURM_LOCAL_SHARED:-}" | while read -r d; do
    case "$d" in
      /tmp/?*) echo "${d%/}" ;;
      ?*) say "SLURM_LOCAL_SHARED: $d is not under /tmp (every node sees it already)" >&2 ;;
    esac
  done
}

# The holder owns a node's namespaces for as long as the node lives. Run as
# `sh -c "$HOLDER" holder NODE PIDFILE HOSTTMP SHARED...` in fresh UTS and mount namespaces.
# shellcheck disable=SC2016 # expanded by the holder's shell
HOLDER='set -e
node=$1 pidfile=$2 hosttmp=$3
shift 3
hostname "$node"
mkdir -p "$hosttmp"
mount --bind /tmp "$hosttmp"
mount -t tmpfs -o mode=1777 "tmp-$node" /tmp
mount -t tmpfs -o mode=1777 "shm-$node" /dev/shm
for d in "$@"; do
  mkdir -p "$d"
  mount --bind "$hosttmp${d#/tmp}" "$d"
done
echo $$ >"$pidfile"
exec sleep infinity'

hosts_set() { # nodes...: their lines in /etc/hosts, written in place (it may be a bind mount)
  local keep n
  keep=$(grep -v "$HOSTS_MARK\$" /etc/hosts || true)
  {
    [ -z "$keep" ] || printf '%s\n' "$keep"
    for n in "$@"; do
      printf '%s\t%s\t%s\n' "$(node_addr "$n")" "$n" "$HOSTS_MARK"
    done
  } >"$RUN_DIR/hosts.new"
  cat "$RUN_DIR/hosts.new" >/etc/hosts
  rm -f "$RUN_DIR/hosts.new"
}

clean_spool() { # node: what a crashed node's step daemons left behind, as a reboot would
  # Slurm's pmix plugin neither rebinds a stale step socket nor reuses a stale /tmp folder: a
  # requeued job (same step id) would fail to launch on a node whose slurmstepd was killed.
  # The files of steps still alive on the node stay.
  local f step live
  live=$(for p in $(ip netns pids "$1" 2>/dev/null); do
    { tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null
    echo
  done)
  for f in "$STATE_DIR/d/$1"/stepd.slurm.pmix.* "$STATE_DIR/d/$1"/pmix.* /tmp/spmix_appdir_*; do
    [ -e "$f" ] || continue
    case "$f" in /tmp/*) step=${f##*_} ;; *) step=${f##*pmix.} ;; esac # e.g. 74.0
    grep -qF "slurmstepd: [$step]" <<<"$live" || rm -rf "$f"
  done
}

node_up() { # node: bridge, namespace, link, holder, slurmd (each only when missing)
  local n=$1 _ shared=()
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  [ -e "/run/netns/$n" ] || ip netns add "$n"
  if ! ip link show "hv-$n" >/dev/null 2>&1; then
    ip link add "hv-$n" type veth peer name eth0 netns "$n"
  fi
  ip link set "hv-$n" master "$BRIDGE" up
  ip -n "$n" addr replace "$(node_addr "$n")/24" dev eth0
  ip -n "$n" link set lo up
  ip -n "$n" link set eth0 up
  if ! holder_pid "$n" >/dev/null; then
    mapfile -t shared < <(shared_dirs)
    rm -f "$RUN_DIR/node-$n.pid"
    setsid nsenter --net="/run/netns/$n" unshare --uts --mount --propagation private -- \
      sh -c "$HOLDER" holder "$n" "$RUN_DIR/node-$n.pid" "$RUN_DIR/hosttmp" "${shared[@]}" \
      </dev/null >>"$LOG_DIR/node-$n.log" 2>&1 &
    for _ in $(seq 50); do
      holder_pid "$n" >/dev/null && break
      sleep 0.1
    done
    holder_pid "$n" >/dev/null || die "node $n did not come up: $(tail -n 3 "$LOG_DIR/node-$n.log" | tr '\n' ' ')"
    say "node $n up: $(node_addr "$n") on $BRIDGE${shared[*]:+, sharing ${shared[*]}}"
  fi
  # a node whose slurmd died comes back as from a reboot (clean_spool's /tmp is the node's)
  daemon_pid "slurmd-$n" >/dev/null || in_node "$n" bash -c "$(declare -f clean_spool); STATE_DIR=$STATE_DIR clean_spool $n"
  start_daemon slurmd "$n"
}

node_down() { # node: slurmd, every process left in the node, its namespaces and link
  local n=$1 pid pids
  if pid=$(daemon_pid "slurmd-$n"); then
    stop_pid slurmd "$pid"
  fi
  if [ -e "/run/netns/$n" ]; then
    pids=$(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
      # shellcheck disable=SC2086 # a list of pids
      kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$n"
  fi
  ip link del "hv-$n" 2>/dev/null || true
  rm -f "$RUN_DIR/node-$n.pid" "$RUN_DIR/slurmd-$n.pid"
}

nodes_down() {
  local n
  for n in $(current_nodes); do
    say "removing node $n"
    node_down "$n"
  done
  rm -f "$NODES_FILE"
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
  fi
  if grep -q "$HOSTS_MARK\$" /etc/hosts 2>/dev/null; then
    hosts_set
  fi
}

node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n 1; }

wait_idle() { # nodes...
  local deadline state n pending=() resumed=0
  deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    pending=()
    for n in "$@"; do
      state=$(node_state "$n" || true)
      case "$state" in
        idle | mixed | allocated | idle+* | mixed+* | allocated+*) ;;
        down* | drain* | inval* | fail*)
          pending+=("$n")
          if [ "$resumed" -lt $((3 * $#)) ]; then
            say "node $n is $state: resuming it"
            scontrol update nodename="$n" state=resume 2>/dev/null || true
            resumed=$((resumed + 1))
          fi
          ;;
        *) pending+=("$n") ;;
      esac
    done
    if [ "${#pending[@]}" -eq 0 ]; then
      say "nodes $(echo "$@" | tr ' ' ,): $(sinfo -h -o '%T' | sort -u | paste -sd, -)"
      return 0
    fi
    sleep 1
  done
  sinfo -N -l >&2 || true
  n=${pending[0]}
  die "node $n not idle after ${START_TIMEOUT} s (state '$(node_state "$n")', reason: $(scontrol show node "$n" 2>/dev/null | sed -n 's/.*Reason=//p' | head -n 1)); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd*.log"
}

# ----------------------------------------------------------------------------------- commands

cmd_start() {
  need_root start
  local nodes n
  nodes=$(node_names "$NNODES")
  mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d"
  install_packages
  start_munge
  if write_conf; then
    # A new or changed configuration: the daemons and nodes made for the old one go.
    stop_daemons
    nodes_down
  fi
  if [ -n "$nodes" ]; then
    echo "$nodes" >"$NODES_FILE"
    # shellcheck disable=SC2086 # node names
    hosts_set $nodes
  fi
  start_daemon slurmctld
  if [ -z "$nodes" ]; then
    start_daemon slurmd
    wait_idle "$NODE"
  else
    for n in $nodes; do
      node_up "$n"
    done
    # shellcheck disable=SC2086 # node names
    wait_idle $nodes
  fi
  say "ready: sbatch/srun/sinfo use $CONF (partition $PARTITION)"
}

cmd_stop() {
  need_root stop
  nodes_down
  stop_daemons
  local pid
  if pid=$(munge_pid); then
    say "stopping munged (pid $pid)"
    stop_pid munged "$pid"
  fi
  say "stopped"
}

cmd_status() {
  local name pid rc=0 n nodes
  nodes=$(current_nodes)
  for name in slurmctld $([ -n "$nodes" ] || echo slurmd); do
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
  for n in $nodes; do
    if pid=$(holder_pid "$n"); then
      say "node $n: $(node_addr "$n"), namespaces held by pid $pid, slurmd $(daemon_pid "slurmd-$n" || echo 'not running')"
    else
      say "node $n: not running"
      rc=3
    fi
  done
  if command -v sinfo >/dev/null; then
    sinfo -N || rc=3
  else
    say "sinfo not installed (run: $0 start)"
    rc=3
  fi
  return "$rc"
}

cmd_hostfile() {
  local n nodes
  nodes=$(current_nodes)
  [ -n "$nodes" ] || die "no emulated nodes: start them with $0 start --nodes N"
  for n in $nodes; do
    echo "$n slots=$(nproc --all)"
  done
}

parse_nodes() { # start's options
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes)
        NNODES=${2:-}
        shift $(($# > 1 ? 2 : 1))
        ;;
      --nodes=*)
        NNODES=${1#--nodes=}
        shift
        ;;
      *) die "start: unknown option '$1' (usage: $0 start [--nodes N])" ;;
    esac
  done
  if ! [[ "$NNODES" =~ ^[1-9][0-9]?$ ]] || [ "$NNODES" -gt 64 ]; then
    die "--nodes must be a number from 1 to 64, not '$NNODES'"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start)
    parse_nodes "$@"
    cmd_start
    ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  hostfile) cmd_hostfile ;;
  exec)
    need_root exec
    [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."
    node=$1
    shift
    in_node "$node" "$@"
    ;;
  restart)
    parse_nodes "$@"
    cmd_stop
    cmd_start
    ;;
  *)
    echo "usage: $0 start [--nodes N] | stop | status | hostfile | exec NODE CMD... | restart [--nodes N]" >&2
    exit 2
    ;;
esac
