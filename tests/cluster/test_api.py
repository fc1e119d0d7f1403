"""The Python API across emulated nodes: the example's own loop with Hier-AVG at 2 nodes x 2
ranks (``srun --mpi=pmix`` into the nodes of ``scripts/slurm_local.sh start --nodes 4``): each
node's two ranks form a group by host name, the rounds cross real TCP, every rank ends with
the same bits."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT
from tests.slurm.helpers import Cluster, srun

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


@pytest.mark.parametrize("mode", ["blocking", "nonblocking"])
def test_hier_avg_in_your_own_loop_on_two_nodes(cluster: Cluster, tmp_path, mode: str) -> None:
    out = tmp_path / "result.json"
    argv = [sys.executable, str(ROOT / "examples" / "own_loop.py"), "--algo", "hier-avg"]
    argv += ["--period", "2", "--out", str(out)]
    if mode == "nonblocking":
        argv.append("--nonblocking")
    job = srun(2, 2, argv, tmp_path / "job.log", name=f"api-{mode}")
    assert job.rc == 0, job.text
    r = json.loads(out.read_text())
    assert r["world_size"] == 4 and r["engine"] == "mpi", r
    assert r["stats"]["group"] == [0, 1], r["stats"]  # rank 0's group: the ranks of its node
    assert r["stats"]["group_rounds"] > 0 and r["stats"]["rounds"] > 0, r["stats"]
    assert len(r["checksums"]) == 4 and len(set(r["checksums"])) == 1, r["checksums"]
    shards = [set(s) for s in r["shards"]]
    assert sum(map(len, shards)) == len(set().union(*shards)) == 8192  # disjoint quarters
    assert r["test_acc"] >= 0.9, r["test_acc"]
