"""Asynchronous synchronisation across real ranks: no lost update, reductions, consensus."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import mpirun, summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

CHECK = "tests/mpi/async_check.py"
DIGITS = ["--dataset", "digits", "--model", "mlp", "--lr", "0.05", "--momentum", "0.9"]


@pytest.mark.parametrize(
    ("engine", "rule", "n"), [("mpi", "hogwild", 2), ("mpi", "leashed", 4), ("gloo", "hogwild", 2)]
)
def test_no_update_lost_while_a_round_is_in_flight(engine: str, rule: str, n: int) -> None:
    res = mpirun(n, [sys.executable, CHECK, engine, f"no-lost-update:{rule}"], timeout=150)
    assert res.rc == 0 and res.out.count("OK") == n, res.text


@pytest.mark.parametrize("engine", ["mpi", "gloo"])
def test_hier_avg_groups_are_consecutive_ranks(engine: str) -> None:
    res = mpirun(4, [sys.executable, CHECK, engine, "groups"], timeout=150)
    assert res.rc == 0 and res.out.count("OK groups") == 4, res.text


def test_hier_avg_every_step_is_sync_sgd(tmp_path) -> None:
    """K1 = K2 = 1 averages the models after every step: for plain SGD, that is sync SGD."""
    common = ["--dataset", "digits", "--model", "mlp", "--lr", "0.05", "--epochs", "1"]
    a = train(2, *common, "--algo", "hier-avg", "--group-size", "1", "--out", str(tmp_path / "h"))
    b = train(2, *common, "--algo", "sync", "--out", str(tmp_path / "s"))
    assert a.rc == 0 and b.rc == 0, a.text + b.text
    import torch

    sa = torch.load(tmp_path / "h" / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "s" / "model.pt", weights_only=True)["state_dict"]
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0), k


CASES = [
    (algo, n, w)
    for algo in ("local-async", "lasgd", "hier-avg-nb")
    for n, w in ((2, 1), (2, 2), (4, 1))
] + [("local-async", 4, 2)]


@pytest.mark.parametrize(("algo", "n", "w"), CASES, ids=[f"{a}-{n}x{w}" for a, n, w in CASES])
def test_async_algorithms_reach_90_percent_with_consensus(tmp_path, algo: str, n: int, w: int):
    flags = {
        "local-async": ["--algo", "local-async", "--period", "4"],
        "lasgd": ["--algo", "lasgd", "--period", "4"],
        "hier-avg-nb": [
            "--algo",
            "hier-avg",
            "--group-size",
            "2",
            "--local-period",
            "2",
            "--global-period",
            "4",
            "--hier-mode",
            "nonblocking",
        ],
    }[algo]
    res = train(n, *DIGITS, *flags, "--epochs", "8", "--workers", str(w), "--out", str(tmp_path))
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["final_test_acc"] >= 0.90, s["final_test_acc"]
    assert len(s["param_checksums"]) == n and len(set(s["param_checksums"])) == 1
    assert s["averaging_rounds"] >= 1
    assert len(s["comm_inflight_s"]) == n and all(f > 0 for f in s["comm_inflight_s"]), s
