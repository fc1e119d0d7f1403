"""scripts/slurm_local.sh: the local cluster comes up, stays up, and says how it is."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.slurm.helpers import SLURM_LOCAL, Cluster, node_state, run

# The first test that asks for the cluster may install Debian's packages: minutes.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def test_cluster_is_up(slurm_cluster: Cluster) -> None:
    # A job of an earlier session, ended by the restart, can leave the node COMPLETING for a few
    # seconds while slurmd cleans up: up, but not yet schedulable. Wait that out (60 s at most).
    deadline = time.monotonic() + 60
    while (state := node_state().split("+")[0]) == "completing" and time.monotonic() < deadline:
        time.sleep(1)
    assert state in ("idle", "mixed", "allocated"), f"{state}: {slurm_cluster.start_log}"
    proc = run(["sinfo", "-h", "-o", "%P %a %D %c"])
    assert proc.returncode == 0 and " up 1 " in proc.stdout, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[3]) == os.cpu_count(), "NodeName ... CPUs=$(nproc)"


@pytest.mark.skipif(os.geteuid() != 0, reason="start/status of the daemons needs root")
@pytest.mark.timeout(120)
def test_start_is_idempotent_and_status_reports(slurm_cluster: Cluster) -> None:
    again = run(["bash", str(SLURM_LOCAL), "start"], timeout=100)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ready" in again.stdout and "starting slurmctld" not in again.stdout
    status = run(["bash", str(SLURM_LOCAL), "status"], timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    for daemon in ("slurmctld running", "slurmd running", "munged running", "PARTITION"):
        assert daemon in status.stdout, status.stdout
    conf = Path("/etc/slurm/slurm.conf").read_text()
    for line in (
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "OverSubscribe=FORCE",
    ):
        assert line in conf


@pytest.mark.timeout(60)
def test_usage_error() -> None:
    proc = run(["bash", str(SLURM_LOCAL), "bogus"], timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
