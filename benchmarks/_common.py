"""What every benchmark script needs: the machine's cores and foreign load, child jobs run as
a process group (killed whole on a timeout or Ctrl-C), mpirun and its environment, versions,
bandwidth caps on the links of ``scripts/slurm_local.sh``'s emulated nodes.

Each benchmark is run as ``python benchmarks/NAME.py`` from a checkout; this file sits next to
it on ``sys.path`` (``benchmarks/`` is the script's own folder).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---- other jobs on a shared machine ---------------------------------------------------------
def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core): /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its waited-for descendants (the benchmark's jobs)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Foreign:
    """Cores used by other jobs (not this process tree) between construction and ``cores()``."""

    def __init__(self) -> None:
        self.b0, self.c0, self.t0 = machine_busy_s(), own_cpu_s(), time.monotonic()

    def cores(self) -> float:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, (machine_busy_s() - self.b0) - (own_cpu_s() - self.c0)) / dt


def wait_idle(max_wait_s: float, threshold: float) -> float:
    """Wait (at most ``max_wait_s``) until other jobs use fewer than ``threshold`` cores over
    0.5 s; returns the last reading (NaN without /proc/stat)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = Foreign()
        time.sleep(0.5)
        busy = probe.cores()
        if not busy >= threshold or time.monotonic() > deadline:
            return busy


# ---- child jobs -------------------------------------------------------------------------------
def run_tree(
    cmd: list[str], timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess | None:
    """Run ``cmd`` in a session of its own, capturing its output; on a timeout (returns None)
    or any exception of ours (Ctrl-C, SIGTERM) the whole tree is killed: mpirun, its ranks,
    their spawned workers."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        _kill_group(proc, only_leftovers=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen, only_leftovers: bool = False) -> None:
    """SIGKILL the job's process group (left-overs too: a worker its parent failed to reap)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if not only_leftovers:
        proc.communicate()


def die_with_parent() -> None:
    """In a benchmark's own worker process: SIGKILL when the parent dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- MPI ------------------------------------------------------------------------------------
def mpirun_exe(given: str | None) -> str:
    for cand in (given, Path(sys.executable).parent / "mpirun", shutil.which("mpirun")):
        if cand and Path(cand).exists():
            return str(cand)
    sys.exit(f"{Path(sys.argv[0]).name}: mpirun not found (pass --mpirun PATH)")


def mpi_env() -> dict[str, str]:
    """This environment for an ``mpirun`` job: root allowed, the venv first on PATH, unbuffered
    output, no torch rendezvous variables of an enclosing launcher."""
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "HPC_ASGD_FAULT"):
        env.pop(k, None)
    return env


# ---- emulated nodes (scripts/slurm_local.sh start --nodes N) ----------------------------------
def rate_bits(rate: str) -> float:
    """tc's rate in bit/s: ``100mbit`` -> 1e8 (bit units only; tc's ``bps`` means bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected a number and kbit, mbit, gbit or bit")
    return float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]


def link_tc(node: str, *tc: str) -> list[str]:
    """``tc`` on NODE's link: [0] the host side hv-NODE (traffic to the node), [1] the node's
    own eth0 (traffic from it), entered by its network namespace (root only)."""
    host = ["tc", "qdisc", tc[0], "dev", f"hv-{node}", "root", *tc[1:]]
    inside = ["nsenter", f"--net=/run/netns/{node}", *host[:4], "eth0", *host[5:]]
    return [host, inside]


@contextlib.contextmanager
def capped_links(nodes: list[str], rate: str):
    """Cap each node's link at ``rate`` both ways (tbf) for the ``with`` block; every qdisc put
    on is taken off on the way out, after an error or Ctrl-C too."""
    added: list[list[str]] = []
    try:
        for node in nodes:
            tbf = ("tbf", "rate", rate, "burst", "128kb", "latency", "50ms")
            for add, rm in zip(link_tc(node, "replace", *tbf), link_tc(node, "del"), strict=True):
                added.append(rm)
                subprocess.run(add, check=True, capture_output=True, text=True)
        yield
    finally:
        for rm in reversed(added):
            subprocess.run(rm, check=False, capture_output=True)


def versions(mpi: bool = False) -> dict[str, str]:
    """Versions of what the figures depend on; with ``mpi``, mpi4py and the MPI library."""
    import numpy
    import torch

    import hpc_asgd

    out = {
        "hpc_asgd": hpc_asgd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
    }
    if mpi:
        import mpi4py

        code = "from hpc_asgd.comm.mpi import library_version as v; print(v())"
        res = run_tree([sys.executable, "-c", code], 60, mpi_env())
        lib = res.stdout if res is not None and res.returncode == 0 else "unknown"
        out["mpi4py"] = mpi4py.__version__
        out["mpi_library"] = lib.replace("\x00", "").strip()  # the C string's NUL
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
