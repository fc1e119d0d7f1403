"""``--min-ranks`` across emulated nodes: a 4-node sbatch job (one rank per node,
``LAUNCHER=mpirun`` with ``--with-ft ulfm``, W = 2 Leashed-SGD workers per rank) whose rank on
node3 loses every process (main process, fork server, workers) while the node's daemons live
on. The 3 survivors shrink, go on and end in bitwise consensus.

Before the reliable-broadcast propagator was switched on (``comm/mpi.py``), the rank on node2
never learnt of its neighbour's death here and timed out; this run is its test.

A replacement (``--max-ranks``) across these nodes joins and the job ends in consensus over 4
(12 sbatch runs of 12, by hand and in tests), but Open MPI 5.0.11's mpirun then aborted at its
own exit in 2 of them ("free(): invalid next size", after every output was written; the job
then reads FAILED): that case is tested on one machine (``tests/mpi/test_elastic.py``), where
mpirun exited 0 every time, and not here, where the test would fail for the launcher's
teardown.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm.helpers import Cluster, Submission

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

BASE = "--comm-timeout 30 --min-ranks 2"
CASES = {
    # W = 2 leashed workers per rank, lasgd: the 3 survivors finish
    "shrink-w2": ("lasgd", f"{BASE} --period 4 --update leashed", "killgroup@2:30", "2"),
}


def _submit(base: Path, name: str) -> tuple[Submission, Path]:
    algo, extra, fault, workers = CASES[name]
    out = base / name
    env = {
        "DATASET": "digits",
        "MODEL": "mlp",
        "ALGO": algo,
        "EPOCHS": "8",
        "PRESET": "",  # flags only: K = the template's (8) for local-sgd, 4 for lasgd here
        "LAUNCHER": "mpirun",
        "MPIRUN_ARGS": "--map-by slot:oversubscribe --with-ft ulfm",
        "OUT_DIR": str(out),
        "EXTRA_ARGS": extra,
        "HPC_ASGD_FAULT": fault,
    }
    if workers:
        env["WORKERS"] = workers
    args = ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]
    return Submission("cifar100_lasgd.sh", base / f"{name}.log", sbatch_args=args, env=env), out


@pytest.fixture(scope="module")
def jobs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("elastic-nodes")
    jobs = {}
    for name in CASES:  # one after the other: two ULFM jobs beside each other on node1
        sub, out = _submit(base, name)  # (mpirun's) once left rank 0 untold of a loss
        jobs[name] = (sub.result(timeout=300), out)
    return jobs


def test_the_survivors_of_a_rank_with_workers_finish_across_nodes(jobs: dict) -> None:
    job, out = jobs["shrink-w2"]
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 3 and s["consensus"] and len(s["param_checksums"]) == 3
    assert s["final_test_acc"] >= 0.6, s["final_test_acc"]  # W = 2 leashed: 0.75-0.90 here
    [m] = s["membership"]
    assert m["left"] == [2] and m["hosts"] == ["node3"] and 0 < m["workers_restart_s"] < 5, m
    assert s["hosts"] == ["node1", "node2", "node4"], s["hosts"]
    assert not job.error_lines(), job.describe()
