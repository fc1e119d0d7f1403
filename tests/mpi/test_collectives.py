"""Every engine passes the same collective checks at 1, 2 and 4 real ranks under mpirun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, mpi_env, mpirun

CHECK = "tests/mpi/collectives_check.py"
CASES = [("local", 1), ("mpi", 1), ("mpi", 2), ("mpi", 4), ("gloo", 1), ("gloo", 2), ("gloo", 4)]


@pytest.mark.mpi
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("engine", "n"), CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_collectives(engine: str, n: int) -> None:
    res = mpirun(n, [sys.executable, CHECK, engine], timeout=120)
    assert res.rc == 0, res.text
    assert res.out.count(f"OK {engine}") == n, res.text


@pytest.mark.mpi
@pytest.mark.timeout(100)
@pytest.mark.parametrize("engine", ["mpi", "gloo"])
def test_deadline_names_missing_rank(engine: str) -> None:
    res = mpirun(3, [sys.executable, CHECK, engine, "timeout"], timeout=80)
    assert res.rc == 0, res.text
    assert res.out.count("NAMED rank") == 2, res.text


@pytest.mark.timeout(150)
def test_gloo_under_torchrun_joins_the_agents_store() -> None:
    """torchrun's agent hosts the rendezvous store: the ranks pass the same checks, and rank 0
    no longer tries to host a second store on its port (torch logged that failed bind as an
    "[E ... TCPStore.cpp] The server socket ... has failed to bind" line)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", CHECK, "gloo"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=mpi_env(),
        cwd=ROOT,
        start_new_session=True,  # a hang kills torchrun and its workers, nothing else
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung past 120 s\n{out}\n{err}")
    text = f"{out}\n{err}"
    assert proc.returncode == 0, text
    assert out.count("OK gloo") == 2, text
    assert "failed to bind" not in err, text
