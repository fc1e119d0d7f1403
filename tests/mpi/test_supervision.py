"""Supervision of a rank's workers: stalls, orphans (real processes, and the watch's clock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpc_asgd.rules.base import AtomicArray
from hpc_asgd.workers import DONE, LIMIT, NCTL, STOP, WorkerError, WorkerPool
from tests.conftest import ROOT, assert_no_orphans, mpi_env, session_members, train

DIGITS = ["--dataset", "digits", "--model", "mlp", "--lr", "0.05"]


# ---- the watch's clock (no processes) ---------------------------------------------------------
def _pool(workers: int = 2, timeout: float = 5.0) -> WorkerPool:
    ctl = AtomicArray(NCTL)
    spec = SimpleNamespace(rank=3, comm_timeout=timeout, ctl=ctl, busy=None)
    pool = WorkerPool(spec, workers, ctx=None, stall_timeout=timeout)
    pool.procs = [SimpleNamespace(pid=1000 + i) for i in range(workers)]
    spec.ctl[LIMIT].store(100)
    return pool


def test_the_stall_deadline_is_three_quarters_of_the_comm_timeout() -> None:
    # the stalled rank, which knows the worker, speaks before its peers' collective deadline
    spec = SimpleNamespace(rank=0, comm_timeout=8.0, ctl=AtomicArray(NCTL), busy=None)
    assert WorkerPool(spec, 2, ctx=None).stall_timeout == 6.0


def test_a_worker_stuck_in_one_step_is_named_with_its_pid() -> None:
    pool = _pool()
    busy = pool.spec.busy
    busy[0], busy[1] = 8, 7  # both in a step
    pool.watch(now=0.0)
    busy[0] = 9  # worker 0 moves on, worker 1 stays in step 6
    pool.spec.ctl[DONE].store(7)
    pool.watch(now=4.0)
    busy[0] = 10
    pool.spec.ctl[DONE].store(8)
    stall = r"^rank 3 worker 1 \(pid 1001\) took no node step in 5 s"
    with pytest.raises(WorkerError, match=stall):
        pool.watch(now=5.5)


def test_holds_and_slow_steps_within_the_deadline_are_no_stall() -> None:
    pool = _pool()
    ctl, busy = pool.spec.ctl, pool.spec.busy
    ctl[DONE].store(100)  # every worker held at the limit (main process evaluates, averages)
    pool.watch(now=0.0)
    pool.watch(now=50.0)  # held far past the deadline: the clock does not run
    ctl[LIMIT].store(200)  # released: the node's clock starts now, not at the last change of DONE
    pool.watch(now=51.0)
    busy[0] = 101
    pool.watch(now=52.0)
    pool.watch(now=56.5)  # a step of 4.5 s, DONE unchanged for 5.5 s: within the deadline
    busy[0] = 0
    ctl[DONE].store(101)
    pool.watch(now=57.0)
    ctl[STOP].store(1)  # stopping: workers end, DONE stays
    pool.watch(now=90.0)


def test_a_node_that_stops_between_steps_is_caught_by_its_step_counter() -> None:
    pool = _pool()
    pool.watch(now=0.0)  # DONE 0 below LIMIT 100, no worker inside a step
    pool.watch(now=4.9)
    with pytest.raises(WorkerError, match=r"worker 0 \(pid 1000\), worker 1 \(pid 1001\) took no"):
        pool.watch(now=5.1)


# ---- real processes ---------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_stopped_worker_ends_the_rank_within_the_deadline() -> None:
    """A SIGSTOP-ed worker used to hang the rank silently until killed."""
    res = train(
        1,
        *DIGITS,
        *("--epochs", "5", "--workers", "2", "--comm-timeout", "5"),
        env={"HPC_ASGD_FAULT": "stop@0:30"},
        timeout=90,
    )
    assert res.rc != 0
    lines = res.error_lines()
    assert len(lines) == 1, res.text
    assert "rank 0 worker " in lines[0] and "took no node step in 3.75 s" in lines[0], res.text
    assert res.seconds < 60, res.seconds
    assert_no_orphans(res.sid)


def _family(sid: int, main: int) -> tuple[list[int], list[int]]:
    """The children of ``main`` in session ``sid`` but multiprocessing's resource tracker (the
    fork server), and their children (the workers)."""
    parents = {}
    for pid in session_members(sid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    servers = [pid for pid, ppid in parents.items() if ppid == main]
    return servers, [pid for pid, ppid in parents.items() if ppid in servers]


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["start-up", "workers", "training"])
def test_rank_killed_leaves_no_orphan(when: str) -> None:
    """SIGKILL of the rank's main process while its fork server starts (the data loads), as
    its workers start, and while they train: neither the server nor a worker may live on
    under PID 1 (the death signal used to be armed only after the workers' imports)."""
    proc = subprocess.Popen(
        # never to finish: the kill comes at most 2 s after the workers run, whatever their pace
        [sys.executable, "-m", "hpc_asgd.cli", "train", *DIGITS, "--epochs", "5000", "--workers=2"],
        cwd=ROOT,
        env=mpi_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            servers, workers = _family(proc.pid, proc.pid)
            if servers if when == "start-up" else len(workers) == 2:
                break
            time.sleep(0.005)
        assert servers and (when == "start-up" or len(workers) == 2), "nothing started"
        if when == "training":
            time.sleep(2.0)
            assert len(_family(proc.pid, proc.pid)[1]) == 2, "workers gone: too late to test"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert_no_orphans(proc.pid, grace=8.0)
    finally:
        for pid in session_members(proc.pid):  # never leave them behind, even on failure
            os.kill(pid, signal.SIGKILL)


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_rank_that_hangs_at_start_up_is_named() -> None:
    """The start-up exchange (status addresses, token) used to wait without a deadline."""
    res = train(
        2,
        *DIGITS,
        *("--epochs", "1", "--comm", "mpi", "--comm-timeout", "4"),
        env={"HPC_ASGD_FAULT": "startstop@1:0"},
        timeout=60,
    )
    assert res.rc != 0
    line = "mpi start-up exchange timed out after 4 s on rank 0: rank(s) 1 did not arrive"
    assert line in res.text, res.text
    assert res.seconds < 40, res.seconds
    assert_no_orphans(res.sid)
