"""Asynchronous synchronisation across real ranks: no lost update, reductions, consensus."""

from __future__ import annotations

import json
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
    # 4 ranks have half the steps per epoch of 2; at 8 epochs (88 node steps, ~10 rounds
    # here) local-async 4x2 ended between 0.83 and 0.95 on this 2-core machine, at 16 at 0.95-0.97
    epochs = "8" if n == 2 else "16"
    res = train(n, *DIGITS, *flags, "--epochs", epochs, "--workers", str(w), "--out", str(tmp_path))
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["final_test_acc"] >= 0.90, s["final_test_acc"]
    assert len(s["param_checksums"]) == n and len(set(s["param_checksums"])) == 1
    assert s["averaging_rounds"] >= 1
    assert len(s["comm_inflight_s"]) == n and all(f > 0 for f in s["comm_inflight_s"]), s


KEEP = {  # one case per process layout: in process, one spawned worker, W = 2 workers
    "lasgd-1": ["--algo", "lasgd", "--period", "4"],
    "local-async-1": ["--algo", "local-async", "--period", "4"],
    "hier-avg-nb-2": [
        *("--algo", "hier-avg", "--group-size", "1", "--local-period", "2"),
        *("--global-period", "2", "--hier-mode", "nonblocking", "--workers", "2"),
    ],
}


@pytest.mark.parametrize("case", list(KEEP))
def test_job_budget_fast_rank_trains_on_and_the_straggler_stops_short(tmp_path, case: str):
    """--budget job (the default): rank 0 (4x faster) takes more than its scheduled steps and
    rank 1 fewer, until their sum reaches the job's budget (2 x 4 epochs); every step is
    counted and averaged in, the rows' epochs are the job's, and the run ends in consensus."""
    flags = [*DIGITS, *KEEP[case], "--epochs", "4", "--slow-rank", "1", "--slow-factor", "4"]
    if case == "lasgd-1":  # ends at lr 0 at the job's end, not at a rank's --epochs node steps
        flags += ["--lr-schedule", "cosine", "--lr", "0.1"]
    flags += ["--out", str(tmp_path)]
    res = train(2, *flags)
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    total, taken = s["steps_per_rank"], s["steps_taken"]
    assert s["budget"] == "job" and s["ended_by"] == "steps", s
    assert taken[0] > total > taken[1] and taken[0] > 2 * taken[1], taken
    # the sum reaches the budget; past it only by what the ranks took while the round that
    # showed it spent was in flight (a few rounds of K = 4 steps at most)
    assert 1.0 <= s["budget_used"] == round(sum(taken) / (2 * total), 4) <= 1.35, s
    batch = s["config"]["batch_size"]
    assert s["samples_processed"] == sum(taken) * batch
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["samples"] == s["samples_processed"]  # the final row counts them too
    assert rows[-1]["epoch"] == pytest.approx(4 * s["budget_used"], abs=0.05)
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    # learnt, far from chance (0.1): 0.86-0.96 seen; lowest for hier-avg-nb when the cores are
    # shared and the slow rank takes 12 of the 193 steps (CI, 0.864): its stale model is mixed in
    assert len(set(s["param_checksums"])) == 1 and s["final_test_acc"] >= 0.8, s


def test_keep_training_in_rank_mode_trains_while_the_straggler_finishes(tmp_path) -> None:
    """--budget rank --keep-training: each rank takes its scheduled steps; rank 0 (4x faster)
    takes extra ones while rank 1 finishes its own, and they are counted and averaged in."""
    flags = [*DIGITS, *KEEP["lasgd-1"], "--epochs", "4", "--budget", "rank", "--keep-training"]
    flags += ["--slow-rank", "1", "--slow-factor", "4", "--out", str(tmp_path)]
    res = train(2, *flags)
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    total, extra = s["steps_per_rank"], s["extra_steps"]
    # rank 1 needs ~4x rank 0's time for its steps: rank 0 fills most of it with extra ones
    assert s["budget"] == "rank" and extra[0] >= total and extra[1] < extra[0] / 4, extra
    assert s["samples_processed"] == (2 * total + sum(extra)) * s["config"]["batch_size"]
    assert len(set(s["param_checksums"])) == 1 and s["final_test_acc"] >= 0.90, s


BUDGETED = {  # a rank meets its peers through rounds (lasgd), or not at all (none)
    "lasgd": ["--algo", "lasgd", "--period", "4"],
    "none-spawn": ["--algo", "none", "--spawn-workers"],
}


@pytest.mark.parametrize("case", list(BUDGETED))
def test_time_budget_ends_the_job(tmp_path, case: str) -> None:
    """--time-budget: 1,000 epochs asked for, 3 s of training given: the ranks stop, still
    meet at their remaining evaluations, and write complete outputs."""
    flags = [*DIGITS, *BUDGETED[case], "--epochs", "1000", "--eval-every", "50"]
    res = train(2, *flags, "--time-budget", "0.05", "--out", str(tmp_path), timeout=120)
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["ended_by"] == "time" and s["time_budget_min"] == 0.05, s
    # 3 s of wall time from the first step, evaluation passes included (train_s leaves them out)
    assert all(2.0 <= t <= 3.5 for t in s["train_s"]), s["train_s"]
    assert 0 < s["budget_used"] < 0.5 and s["final_test_acc"] >= 0.90, s
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 20, rows  # every scheduled evaluation, the last one final
    if case == "lasgd":
        assert len(set(s["param_checksums"])) == 1, s
