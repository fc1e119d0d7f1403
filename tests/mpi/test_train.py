"""End-to-end training runs of real ranks under mpirun (the digits set, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import HOST, summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(180)]

QUICK = ["--dataset", "digits", "--model", "mlp", "--lr", "0.05", "--batch-size", "32"]


def _state(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def test_local_sgd_period_1_equals_sync(tmp_path) -> None:
    """Plain SGD: averaging models after every step == averaging gradients before it."""
    for algo in ("sync", "local-sgd"):
        res = train(
            2,
            *QUICK,
            "--epochs",
            "2",
            "--algo",
            algo,
            "--period",
            "1",
            "--out",
            str(tmp_path / algo),
        )
        assert res.rc == 0, res.text
    a, b = _state(tmp_path / "sync"), _state(tmp_path / "local-sgd")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("engine", ["mpi", "gloo"])
def test_kavg_consensus_and_outputs(tmp_path, engine: str) -> None:
    res = train(
        2,
        *QUICK,
        "--epochs",
        "2",
        "--algo",
        "local-sgd",
        "--period",
        "5",
        "--momentum",
        "0.9",
        "--comm",
        engine,
        "--out",
        str(tmp_path),
    )
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert len(s["param_checksums"]) == 2 and len(set(s["param_checksums"])) == 1, s
    for key in (
        "algo",
        "update",
        "comm",
        "world_size",
        "workers_per_rank",
        "dataset",
        "model",
        "epochs",
        "samples_processed",
        "wall_s",
        "samples_per_s",
        "final_test_acc",
        "final_test_loss",
        "averaging_rounds",
        "param_checksums",
        "versions",
        "config",
        "hosts",
        "setup_s",
        "train_s",
    ):
        assert key in s, key
    assert s["comm"] == engine and s["world_size"] == 2 and s["algo"] == "local-sgd"
    assert s["hosts"] == [HOST, HOST] and "groups" not in s  # groups: hier-avg only
    assert all(len(s[k]) == 2 and min(s[k]) > 0 for k in ("setup_s", "train_s")), s
    # 1437 training digits, 2 shards of 718, 22 steps of 32 per epoch, 2 epochs
    assert s["samples_processed"] == 2 * 22 * 32 * 2
    assert s["averaging_rounds"] == 44 // 5
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert set(rows[0]) >= {"epoch", "time_s", "samples", "train_loss", "test_acc", "test_loss"}
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["config"]["algo"] == "local-sgd"
    assert ckpt["state_dict"] and all(
        isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()
    )


def test_digits_reaches_90_percent_in_a_minute(tmp_path) -> None:
    res = train(
        2,
        "--algo",
        "local-sgd",
        "--period",
        "4",
        "--epochs",
        "8",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--out",
        str(tmp_path),
    )
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["final_test_acc"] >= 0.90, s["final_test_acc"]
    assert s["wall_s"] < 60 and res.seconds < 60, (s["wall_s"], res.seconds)
    assert "final test accuracy" in res.out  # the results table


def test_hier_avg_group_of_one_is_kavg(tmp_path) -> None:
    common = [*QUICK, "--epochs", "1", "--momentum", "0.9"]
    a = train(
        2,
        *common,
        "--algo",
        "hier-avg",
        "--group-size",
        "1",
        "--local-period",
        "2",
        "--global-period",
        "3",
        "--out",
        str(tmp_path / "h"),
    )
    b = train(2, *common, "--algo", "local-sgd", "--period", "6", "--out", str(tmp_path / "k"))
    assert a.rc == 0 and b.rc == 0, a.text + b.text
    assert summary(tmp_path / "h")["param_checksums"] == summary(tmp_path / "k")["param_checksums"]
    assert summary(tmp_path / "h")["groups"] == [[0], [1]]


def test_hier_avg_default_groups_are_nodes(tmp_path) -> None:
    """No --group-size: a group is the ranks of one node, by host name (here one machine)."""
    res = train(4, *QUICK, "--epochs", "1", "--algo", "hier-avg", "--out", str(tmp_path))
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["groups"] == [[0, 1, 2, 3]] and s["hosts"] == [HOST] * 4, s


def test_hier_avg_counts_group_and_global_rounds_and_the_table_says_what_ran(tmp_path) -> None:
    # 22 node steps: a round every K1 = 2 steps (11), every K1*K2 = 6th step a global one (3)
    flags = ["--algo", "hier-avg", "--group-size", "1", "--local-period", "2"]
    flags += ["--global-period", "3", "--epochs", "1", "--out", str(tmp_path)]
    res = train(2, *flags)
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert (s["group_rounds"], s["averaging_rounds"]) == (8, 3), s
    assert s["worker_processes"] == 0  # W = 1 in the rank's own process: no update rule
    rows = [ln.strip().split("  ", 1) for ln in res.out.splitlines() if ln.startswith("  ")]
    table = {k: v.strip() for k, v in rows}
    assert table["averaging rounds"] == "8 group / 3 global", res.out
    assert table["algo / update"] == "hier-avg / none (in-process, W = 1)", res.out
