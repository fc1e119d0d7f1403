"""scripts/slurm_local.sh: the emulated nodes come up, stay up, are separate hosts with real TCP
between them, say how they are, and go away without a trace."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT
from tests.slurm.helpers import (
    NODE_AGENT,
    NODES,
    SLURM_LOCAL,
    Cluster,
    job_env,
    node_states,
    run,
)

# The first test that asks for the cluster may install Debian's packages: minutes.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
NAMES = [f"node{i}" for i in range(1, NODES + 1)]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the nodes' namespaces need root")


def _states() -> dict[str, str]:
    # A job of an earlier session, ended by a restart, can leave a node COMPLETING for a few
    # seconds while slurmd cleans up: up, but not yet schedulable. Wait that out (60 s at most).
    deadline = time.monotonic() + 60
    states = node_states()
    while any(s.startswith("completing") for s in states.values()) and time.monotonic() < deadline:
        time.sleep(1)
        states = node_states()
    return states


def test_cluster_is_up(slurm_cluster: Cluster) -> None:
    states = _states()
    assert sorted(states) == NAMES, states
    assert all(s.split("+")[0] in ("idle", "mixed", "allocated") for s in states.values()), (
        f"{states}: {slurm_cluster.start_log}"
    )
    proc = run(["sinfo", "-h", "-N", "-o", "%N %c"])
    # every node has the hardware's cores (nproc --all), whatever OMP_NUM_THREADS says
    cpus = {ln.split()[0]: int(ln.split()[1]) for ln in proc.stdout.splitlines()}
    assert set(cpus.values()) == {os.cpu_count()}, proc.stdout


@ROOT_ONLY
def test_nodes_are_separate_hosts_with_tcp_between_them(slurm_cluster: Cluster) -> None:
    # own hostname and own /tmp per node: a file made in node1's /tmp is not in node2's
    probe = "import os, socket; print(socket.gethostname(), os.path.exists('/tmp/hpct-mark'))"
    made = run(["bash", str(SLURM_LOCAL), "exec", "node1", "touch", "/tmp/hpct-mark"])
    assert made.returncode == 0, made.stderr
    proc = run(["srun", "-N", "2", "-w", "node1,node2", "-l", sys.executable, "-c", probe])
    got = sorted(proc.stdout.split("\n"))[-2:]
    assert got == ["0: node1 True", "1: node2 False"], proc.stdout + proc.stderr
    assert not Path("/tmp/hpct-mark").exists()  # nor in this host's
    # an MPI allreduce between two nodes, over the bridge
    allreduce = (
        "from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
        "print(socket.gethostname(), c.allreduce(c.rank + 1))"
    )
    proc = run(
        ["srun", "-N", "2", "--mpi=pmix", sys.executable, "-c", allreduce],
        timeout=90,
        env=job_env(),
    )
    assert sorted(proc.stdout.split("\n"))[-2:] == ["node1 3", "node2 3"], proc.stdout + proc.stderr


@ROOT_ONLY
def test_bare_metal_mpirun_across_nodes_with_the_node_agent(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    proc = run(["bash", str(SLURM_LOCAL), "hostfile"])
    assert proc.returncode == 0 and proc.stdout.startswith("node1 slots="), proc.stdout
    hosts.write_text(proc.stdout)
    cmd = [str(BIN / "mpirun"), "--hostfile", str(hosts), "--map-by", "node", "-n", "4"]
    cmd += ["--prtemca", "plm_ssh_agent", str(NODE_AGENT), "hostname"]
    # It takes 0.2 s; once in CI prterun hung at start-up for 90 s and passed 3 of 3 times
    # right after: a second try, after a hang only, keeps that out of the verdict.
    tries = []
    for _ in range(2):
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=job_env(),
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=45)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            tries.append("".join(proc.communicate()))
    else:
        pytest.fail("mpirun with the node agent hung twice:\n" + "\n---\n".join(tries))
    # stderr is kept apart: prterun may warn there (a setpgid race in its ssh launcher,
    # EPERM once the child has exec'd; harmless) while the ranks' output is on stdout.
    assert proc.returncode == 0 and sorted(out.split()) == NAMES, out + err


@ROOT_ONLY
@pytest.mark.timeout(120)
def test_start_is_idempotent_and_status_reports(slurm_cluster: Cluster) -> None:
    # OMP_NUM_THREADS must not shrink the nodes' CPU count (the configuration stays the same)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = run(["bash", str(SLURM_LOCAL), "start", "--nodes", str(NODES)], timeout=100, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ready" in again.stdout and "starting slurm" not in again.stdout, again.stdout
    status = run(["bash", str(SLURM_LOCAL), "status"], timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    for daemon in ("slurmctld running", "munged running", "NODELIST"):
        assert daemon in status.stdout, status.stdout
    for i, name in enumerate(NAMES, 1):
        assert f"node {name}: 10.77.0.{10 + i}, namespaces held by pid" in status.stdout
    conf = Path("/etc/slurm/slurm.conf").read_text()
    for line in (
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "OverSubscribe=FORCE",
        "EnforcePartLimits=ALL",
        f"NodeName=node1 NodeAddr=10.77.0.11 CPUs={os.cpu_count()}",
    ):
        assert line in conf
    assert "10.77.0.12\tnode2" in Path("/etc/hosts").read_text()


def test_a_job_that_can_never_run_is_refused(slurm_cluster: Cluster) -> None:
    """More tasks than the cluster, or one node, has CPUs: refused at once with Slurm's reason."""
    for ask in (
        ["-n", str(NODES * (os.cpu_count() or 1) + 1)],  # the cluster's CPUs
        ["-N", "1", "--ntasks-per-node", str((os.cpu_count() or 1) + 1)],  # a node's
        ["-N", str(NODES + 1)],
    ):  # nodes
        proc = run(["sbatch", *ask, "--wrap", "true"], timeout=30)
        assert proc.returncode != 0, (ask, proc.stdout)
        assert "Batch job submission failed" in proc.stderr, (ask, proc.stderr)


@pytest.mark.timeout(60)
def test_usage_and_refusals() -> None:
    proc = run(["bash", str(SLURM_LOCAL), "bogus"], timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run(["bash", str(SLURM_LOCAL), "start", "--nodes", "0"], timeout=30)
    assert proc.returncode == 1 and "--nodes must be a number from 1 to 64" in proc.stderr
    if os.geteuid() == 0:  # not root: one line, nothing done
        proc = run(["runuser", "-u", "nobody", "--", "bash", str(SLURM_LOCAL), "start"])
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"[slurm_local] error: must run as root (it installs packages, writes "
            f"/etc/slurm/slurm.conf, starts daemons and makes network namespaces); try: sudo "
            f"bash {SLURM_LOCAL} start"
        ], proc.stderr


@ROOT_ONLY
@pytest.mark.timeout(300)
def test_stop_removes_everything_and_start_brings_it_back(slurm_cluster: Cluster) -> None:
    stop = run(["bash", str(SLURM_LOCAL), "stop"], timeout=120)
    try:
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert run(["ip", "netns", "list"]).stdout.strip() == ""
        links = run(["ip", "-o", "link"]).stdout
        assert "hv-node" not in links and "hpcasgd0" not in links, links
        assert "hpc_asgd slurm_local node" not in Path("/etc/hosts").read_text()
        for daemon in ("slurmctld", "slurmd", "munged"):
            assert subprocess.run(["pgrep", "-x", daemon], check=False).returncode == 1, daemon
    finally:
        start = run(["bash", str(SLURM_LOCAL), "start", "--nodes", str(NODES)], timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    assert sorted(_states()) == NAMES
