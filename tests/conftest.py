"""Shared helpers: run real ranks under mpirun with a deadline, and read a run's outputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpc_asgd.env import short_host

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = short_host(socket.gethostname())  # how error lines and summaries name every test rank's host


def mpirun_exe() -> str | None:
    for cand in (BIN / "mpirun", shutil.which("mpirun")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Open MPI refuses root without these; tests oversubscribe 2 cores with up to 4 ranks.
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a test starts each job in a session of its own)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
            pids.append(int(d.name))
    return pids


def assert_no_orphans(sid: int, grace: float = 5.0) -> None:
    """Every process the job started (ranks, workers) is gone, within ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"orphan processes of the job: {left}"


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float
    sid: int = 0  # the job's session: every process it started

    @property
    def text(self) -> str:
        # prterun (Open MPI 5) ends some of its help messages (MPI_ABORT's) with a NUL byte,
        # which then prefixes the next line a rank prints: seen in CI, 2 of 15 runs here.
        return (self.out + self.err).replace("\0", "")

    def error_lines(self) -> list[str]:
        return [ln for ln in self.text.splitlines() if ln.startswith("hpc-asgd: error")]


def mpirun(
    n: int, args: list[str], timeout: float = 120, env: dict[str, str] | None = None
) -> Result:
    """``mpirun -n N <args>`` with a hard deadline; a hang fails the test, never the suite."""
    exe = mpirun_exe()
    if exe is None:
        pytest.fail("mpirun not found: install the 'mpi-wheel' extra (scripts/setup.sh does)")
    cmd = [exe, "-n", str(n), "--oversubscribe", "--bind-to", "none", *args]
    for _ in range(2):
        res = _mpirun_once(cmd, n, args, timeout, env)
        # The launcher itself sometimes fails to start here, before any rank exists (seen once
        # in CI: "The PMIx server's listener thread failed to start", rc 213 after 16 ms).
        # That is Open MPI's start-up, not the code under test: start the job once more.
        if not (res.rc != 0 and res.seconds < 5 and _LAUNCHER_FAILED in res.err):
            return res
        time.sleep(1.0)
    return res


_LAUNCHER_FAILED = "The PMIx server's listener thread failed to start"


def _mpirun_once(
    cmd: list[str], n: int, args: list[str], timeout: float, env: dict[str, str] | None
) -> Result:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=mpi_env(env),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"mpirun -n {n} {' '.join(args)} hung past {timeout} s\n{out}\n{err}")
    return Result(proc.returncode, out, err, time.monotonic() - t0, proc.pid)


def train(n: int, *flags: str, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
    return mpirun(n, [sys.executable, "-m", "hpc_asgd.cli", "train", *flags], timeout, env)


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


SHARED_TMP = Path("/var/tmp") / f"hpc_asgd-tests-{os.getuid()}"


def pytest_configure(config: pytest.Config) -> None:
    """Test folders where every node of the emulated cluster sees them (tests/cluster,
    tests/slurm): each node has a /tmp of its own, as real nodes do, so pytest's default base
    under /tmp would be invisible to the ranks. One folder per session; the 3 newest are kept."""
    if config.option.basetemp is not None or hasattr(config, "workerinput"):
        return
    SHARED_TMP.mkdir(parents=True, exist_ok=True)
    old = sorted(SHARED_TMP.iterdir(), key=lambda p: p.stat().st_mtime)
    for stale in old[:-3]:
        shutil.rmtree(stale, ignore_errors=True)
    config.option.basetemp = str(SHARED_TMP / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


NETS = '''
    """Factories of a user's own (examples/own_factories.py) and bad ones."""
    import torch.nn.functional as F
    from own_factories import build, load
    from own_loop import WaveNet

    def smooth(output, target):
        return F.cross_entropy(output, target, label_smoothing=0.05)

    def boom(input_shape, num_classes):
        raise ValueError("no such layer")

    def number(input_shape, num_classes):
        return 3

    def narrow(input_shape, num_classes):
        return WaveNet(num_classes - 3)

    def five(data_dir, seed):
        return 5

    NOT_A_FUNCTION = 7
'''


@pytest.fixture
def nets(tmp_path: Path) -> dict[str, str]:
    """A user's module of factories, good and bad; the environment that imports it."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent(NETS))
    return {"PYTHONPATH": f"{tmp_path}:{ROOT / 'examples'}:{ROOT}"}
