"""The Horovod engine under mpirun: the shared collective checks, the deadline, and training."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip(
    "horovod.torch",
    reason="Horovod is not installed: run scripts/install_horovod.sh (builds 0.28.1 with C++17)",
)

from tests.conftest import HOST, assert_no_orphans, mpirun, summary, train

pytestmark = pytest.mark.mpi

CHECK = "tests/mpi/collectives_check.py"
ACCURATE = ["--epochs", "8", "--lr", "0.05", "--momentum", "0.9"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_collectives(n: int) -> None:
    res = mpirun(n, [sys.executable, CHECK, "horovod"], timeout=180)
    assert res.rc == 0, res.text
    assert res.out.count("OK horovod") == n, res.text


@pytest.mark.timeout(100)
def test_deadline_names_missing_rank() -> None:
    res = mpirun(3, [sys.executable, CHECK, "horovod", "timeout"], timeout=80)
    assert res.rc == 0, res.text
    assert res.out.count("NAMED rank") == 2, res.text
    assert "SKIPPER-DONE" in res.out, res.text
    assert_no_orphans(res.sid)


FAULTY = ["--comm", "horovod", "--algo", "sync", "--epochs", "5"]


@pytest.mark.timeout(90)
def test_rank_that_raises_aborts_the_job() -> None:
    res = train(
        2, *FAULTY, "--comm-timeout", "10", env={"HPC_ASGD_FAULT": "raise@1:10"}, timeout=60
    )
    assert res.rc != 0
    line = f"hpc-asgd: error on rank 1/2 ({HOST}): RuntimeError: injected fault at step 10"
    assert line in res.text, res.text
    assert res.seconds < 40, res.seconds
    assert_no_orphans(res.sid)


@pytest.mark.timeout(90)
def test_rank_that_stops_answering_is_named() -> None:
    res = train(2, *FAULTY, "--comm-timeout", "4", env={"HPC_ASGD_FAULT": "stop@1:10"}, timeout=60)
    assert res.rc != 0
    assert "horovod allreduce" in res.text, res.text
    assert f"timed out after 4 s on rank 0: rank(s) 1 ({HOST}) did not arrive" in res.text, res.text
    assert res.seconds < 40, res.seconds
    assert_no_orphans(res.sid)


ALGOS = [
    ("none", 2, ["--period", "4"]),
    ("sync", 2, []),
    ("local-sgd", 2, ["--period", "4"]),
    ("hier-avg", 4, ["--group-size", "2", "--local-period", "2", "--global-period", "2"]),
]


@pytest.mark.timeout(260)
@pytest.mark.parametrize(("algo", "n", "flags"), ALGOS, ids=[a[0] for a in ALGOS])
def test_train_reaches_90_percent(tmp_path, algo: str, n: int, flags: list[str]) -> None:
    res = train(
        n,
        "--comm",
        "horovod",
        "--algo",
        algo,
        *ACCURATE,
        *flags,
        "--out",
        str(tmp_path),
        timeout=240,
    )
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["comm"] == "horovod" and s["world_size"] == n and s["algo"] == algo, s
    assert s["final_test_acc"] >= 0.90, s["final_test_acc"]
    assert len(s["param_checksums"]) == n
    if algo != "none":
        assert len(set(s["param_checksums"])) == 1, s["param_checksums"]
    assert "hpc-asgd: error" not in res.text, res.text
