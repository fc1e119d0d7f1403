"""``--min-ranks`` and ``--max-ranks`` across emulated nodes: a 4-node sbatch job (one rank per
node, ``LAUNCHER=mpirun`` with ``--with-ft ulfm``) whose rank on node3 dies while the node's
daemons live on (every process of that rank: main process, fork server, workers). The
survivors shrink and go on; with ``--max-ranks 4`` they start a replacement, which joins from a
live peer, and the job ends in bitwise consensus over 4 again.

Before the reliable-broadcast propagator was switched on (``comm/mpi.py``), the rank on node2
never learnt of its neighbour's death here and timed out; these runs are its test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm.helpers import Cluster, Submission

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

BASE = "--comm-timeout 30 --min-ranks 2"
CASES = {
    # W = 1, local-sgd: a replacement joins
    "join": ("local-sgd", f"{BASE} --max-ranks 4", "kill@2:30", ""),
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
    subs = {name: _submit(base, name) for name in CASES}  # both run at once
    return {name: (sub.result(timeout=400), out) for name, (sub, out) in subs.items()}


def test_a_replacement_joins_across_nodes(jobs: dict) -> None:
    job, out = jobs["join"]
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 4 and s["consensus"] and len(s["param_checksums"]) == 4
    assert s["final_test_acc"] >= 0.8, s["final_test_acc"]
    loss, join = s["membership"]
    assert loss["left"] == [2] and loss["hosts"] == ["node3"], loss
    assert join["joined"] == [2] and join["world_size"] == 4, join
    assert loss["recovery_s"] < 5 and join["join_s"] < 30, s["membership"]
    assert "rank(s) 2 joined" in job.text, job.describe()
    assert not job.error_lines(), job.describe()


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
