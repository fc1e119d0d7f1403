"""Helpers of the SLURM tests: the local cluster, job submission with deadlines, tiny datasets.

Jobs run for real on the emulated cluster of ``scripts/slurm_local.sh start --nodes 4``
(Debian's slurmctld, a slurmd per node, munge; each node a network namespace with its own
hostname and /tmp). Each job is submitted with ``sbatch --wait`` (or run with ``srun``) in a
process of its own, so several can run at once; a job that outlives its deadline is cancelled
and fails its test. Test folders live under /var/tmp (tests/conftest.py), which every node sees.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, ROOT, mpi_env

SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
NODE_AGENT = ROOT / "scripts" / "node_agent.sh"
NODES = 4  # emulated nodes of the test cluster: node1 ... node4
TEMPLATES = ROOT / "slurm"
REQUEUE_EXIT = 85  # slurm/common.sh: "checkpointed, please requeue"


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
        **kw,
    )


def node_states() -> dict[str, str]:
    """``{node: state}`` from sinfo (empty when the cluster does not answer)."""
    try:
        proc = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(ln.split()[:2] for ln in proc.stdout.splitlines() if len(ln.split()) >= 2)


def node_state() -> str:
    """The first node's state."""
    return next(iter(node_states().values()), "")


def cannot_start_reason() -> str | None:
    """Why this machine truly cannot have a local cluster (then the SLURM tests skip)."""
    if os.geteuid() != 0:
        if node_state().split("+")[0] in ("idle", "mixed", "allocated"):
            return None  # a running cluster that someone else started: use it
        return (
            "not root and no running SLURM cluster: scripts/slurm_local.sh start needs root "
            "(it installs Debian's slurm packages and starts the daemons)"
        )
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@dataclass
class Cluster:
    """The running local cluster and what it offers."""

    start_log: str
    pmix: bool  # srun --mpi=pmix starts ranks of the venv's MPI
    pmix_why: str = ""


def start_cluster() -> Cluster:
    reason = cannot_start_reason()
    if reason:
        pytest.skip(reason)
    if os.geteuid() == 0:
        # A fresh machine installs the packages first: minutes, hence the long deadline.
        proc = run(["bash", str(SLURM_LOCAL), "start", "--nodes", str(NODES)], timeout=900)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            pytest.fail(f"scripts/slurm_local.sh start failed ({proc.returncode}):\n{log}")
    else:
        log = "cluster already running (not root: not started by the tests)"
    probe = [
        "srun",
        "--mpi=pmix",
        "-N",
        "2",
        "-n",
        "2",
        "--time=2",
        str(BIN / "python"),
        "-c",
        "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2",
    ]
    try:
        proc = run(probe, timeout=90, env=job_env())
        pmix, why = proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-500:]
    except subprocess.TimeoutExpired:
        pmix, why = False, "srun --mpi=pmix -n 2 did not finish in 90 s"
    return Cluster(log, pmix, why)


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What sbatch exports to a job: the venv on PATH, Open MPI allowed to run as root."""
    env = mpi_env()
    env.pop("OMP_NUM_THREADS", None)  # slurm/common.sh derives it from cpus-per-task / workers
    for var in list(env):  # a test run inside a job must not leak that job into its jobs
        if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
            del env[var]
    # Open MPI 5 maps every rank onto the allocation's first node when oversubscription is
    # switched on as a bare modifier (--oversubscribe, or this default policy of mpi_env):
    # "slot:oversubscribe" keeps Slurm's layout, one node after the other.
    env.pop("PRTE_MCA_rmaps_default_mapping_policy", None)
    env.update(
        # The PyPI Open MPI's PMIx does not know the munge security module that Slurm's PMIx
        # server offers first; native is offered too and silences a help message per rank.
        PMIX_MCA_psec="native",
        MPIRUN_ARGS="--map-by slot:oversubscribe",
        # Ranks started by srun do not know that they oversubscribe the cores, and Open MPI's
        # busy polling then starves the rank they wait for: 3x slower allreduces across the
        # emulated nodes here (mpirun --oversubscribe turns this on by itself).
        OMPI_MCA_mpi_yield_when_idle="1",
    )
    env.update(extra or {})
    return env


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (the cluster keeps finished jobs for MinJobAge)."""
    proc = run(["scontrol", "-o", "show", "job", job_id], timeout=30)
    return (
        dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", proc.stdout.splitlines()[0]))
        if proc.stdout
        else {}
    )


@dataclass
class Job:
    job_id: str
    rc: int  # sbatch --wait's exit status: the job's
    output: Path
    seconds: float
    info: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        # NULs: prterun ends some help messages with one (see tests/conftest.py Result.text)
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return text.replace("\0", "")

    @property
    def state(self) -> str:
        return self.info.get("JobState", "")

    @property
    def exit_code(self) -> str:
        return self.info.get("ExitCode", "")

    def run_seconds(self) -> float:
        """RunTime of the job's last run, from scontrol (whole seconds)."""
        parts = [int(x) for x in re.split(r"[:-]", self.info.get("RunTime", "0:0:0"))]
        secs = 0
        for p, scale in zip(reversed(parts), (1, 60, 3600, 86400), strict=False):
            secs += p * scale
        return float(secs)

    def error_lines(self) -> list[str]:
        return [ln for ln in self.text.splitlines() if ln.startswith("hpc-asgd: error")]

    def describe(self) -> str:
        return f"job {self.job_id} rc={self.rc} {self.info}\n--- {self.output}\n{self.text}"


class Submission:
    """``sbatch --wait --parsable ARGS TEMPLATE`` running in the background."""

    def __init__(
        self,
        template: str | Path,
        output: Path,
        *,
        sbatch_args: tuple[str, ...] | list[str] = (),
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        set_output: bool = True,
    ) -> None:
        path = Path(template)
        if not path.is_absolute():
            path = TEMPLATES / path
        self.output = output
        cmd = ["sbatch", "--wait", "--parsable", *sbatch_args]
        if set_output:
            cmd.append(f"--output={output}")
        cmd.append(str(path))
        self.cmd = cmd
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=job_env(env),
            cwd=cwd,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        # sbatch prints the id as soon as the job is queued, then waits for its end.
        self.job_id = self.proc.stdout.readline().strip().split(";")[0]

    def result(self, timeout: float) -> Job:
        left = max(1.0, timeout - (time.monotonic() - self.t0))
        try:
            _, err = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            if self.job_id:
                run(["scancel", self.job_id], timeout=30)
            self.proc.kill()
            self.proc.communicate()
            info = job_info(self.job_id) if self.job_id else {}
            out = self.output.read_text(errors="replace") if self.output.exists() else ""
            pytest.fail(
                f"job {self.job_id} ({' '.join(self.cmd)}) ran past {timeout} s: {info}\n{out}"
            )
        if not self.job_id:
            pytest.fail(f"sbatch refused {' '.join(self.cmd)}: {err}")
        job = Job(self.job_id, self.proc.returncode, self.output, time.monotonic() - self.t0)
        job.info = job_info(self.job_id)
        if not job.output.exists() and job.info.get("StdOut"):
            job.output = Path(job.info["StdOut"])
        return job


def sbatch_wait(template: str | Path, output: Path, timeout: float = 180, **kw) -> Job:
    return Submission(template, output, **kw).result(timeout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")
    return None


# ------------------------------------------------------------------- tiny data, official formats


def _writers():
    """The official-format writers of the unit tests (IDX, CIFAR's Python 2 pickles)."""
    from tests.unit import test_data

    return test_data


def write_cifar100(root: Path, n_train: int = 64, n_test: int = 16) -> None:
    td = _writers()
    folder = root / "cifar-100-python"
    rng = np.random.default_rng(100)
    for name, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        td.write_py2_pickle(
            folder / name, {"data": rows, "fine_labels": [k % 100 for k in range(n)]}
        )
    td.write_py2_pickle(folder / "meta", {"fine_label_names": [f"f{k}" for k in range(100)]})


def write_cifar10(root: Path, per_batch: int = 16, n_test: int = 16) -> None:
    td = _writers()
    folder = root / "cifar-10-batches-py"
    rng = np.random.default_rng(10)
    for i in range(1, 6):
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        td.write_py2_pickle(folder / f"data_batch_{i}", {"data": rows, "labels": labels})
    rows = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    td.write_py2_pickle(
        folder / "test_batch", {"data": rows, "labels": [j % 10 for j in range(n_test)]}
    )
    td.write_py2_pickle(folder / "batches.meta", {"label_names": [f"c{k}" for k in range(10)]})


def write_mnist(root: Path, n_train: int = 64, n_test: int = 16) -> None:
    td = _writers()
    rng = np.random.default_rng(28)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        td.write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        td.write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_imagenet(root: Path, classes: int = 2, n_train: int = 8, n_val: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(224)
    for split, count in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (24 + 4 * k, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{k}.JPEG")


# ------------------------------------------------------------- a stand-in for the training CLI

FAKE_CLI = """#!{python}
# A stand-in for `hpc-asgd train`: records how it was started, then waits for SIGUSR1 and exits
# 85 ("checkpointed, please requeue") like the real CLI does on preemption.
import json, os, signal, sys, time
if "--help" in sys.argv:
    print("usage: hpc-asgd train [--resume RESUME] [--checkpoint-dir DIR] [--checkpoint-every N]")
    sys.exit(0)
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID") or "0"
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
keys = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "SLURM_RESTART_COUNT", "NCCL_IB_DISABLE")
record = {{"argv": sys.argv[1:], "pid": os.getpid(), "env": {{k: os.environ.get(k) for k in keys}}}}
ready = os.path.join(out, f"ready.{{rank}}.{{restart}}")
with open(ready + ".tmp", "w") as fh:
    json.dump(record, fh)
os.replace(ready + ".tmp", ready)
print(f"fake rank {{rank}} restart {{restart}} started", flush=True)
seconds = os.environ.get("FAKE_SECONDS", "60")
if restart != "0":
    seconds = os.environ.get("FAKE_RESTART_SECONDS", seconds)
deadline = time.time() + float(seconds)
while time.time() < deadline:
    if got:
        print(f"fake rank {{rank}}: got SIGUSR1, checkpointed, exiting 85", flush=True)
        open(os.path.join(out, f"usr1.{{rank}}.{{restart}}"), "w").close()
        sys.exit(85)
    time.sleep(0.05)
print(f"fake rank {{rank}}: done", flush=True)
if rank == "0" and not os.environ.get("FAKE_NO_SUMMARY"):  # the real CLI's: a finished run has one
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({{"fake": True}}, fh)
"""


def write_fake_cli(folder: Path) -> Path:
    """A folder with a fake ``hpc-asgd`` to put first on a job's PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "hpc-asgd"
    exe.write_text(FAKE_CLI.format(python=sys.executable))
    exe.chmod(0o755)
    return folder


# ------------------------------------------------------------------- ranks across the nodes


def srun(
    nodes: int,
    per_node: int,
    argv: list[str],
    log: Path,
    *,
    timeout: float = 240,
    env: dict[str, str] | None = None,
    name: str = "hpct",
) -> Job:
    """``srun -N nodes --ntasks-per-node per_node --mpi=pmix ARGV`` with a deadline: the ranks
    start in the emulated nodes, one Slurm job; a job past its deadline is cancelled (and the
    test fails). The job's output (stdout and stderr) is ``Job.text``."""
    cmd = [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks-per-node={per_node}",
        "--mpi=pmix",
        "--kill-on-bad-exit=1",
        "--time=10",
        f"--job-name={name}",
        *argv,
    ]
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # one intra-op thread per rank: each emulated node believes it has all the cores
            env=job_env({"OMP_NUM_THREADS": "1", **(env or {})}),
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run(["scancel", f"--name={name}"], timeout=30)
            proc.kill()
            proc.wait()
            pytest.fail(f"{' '.join(cmd)} ran past {timeout} s:\n{log.read_text(errors='replace')}")
    return Job(name, rc, log, time.monotonic() - t0)
