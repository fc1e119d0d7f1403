"""The benchmark harness and the figures of compare.py, without running any benchmark: the
retry of disturbed runs, the statistics, the CLI command lines, and compare.py's goals and
tables for the 2-rank and the slow-link (--nodes) modes from made-up runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _harness as h
import compare


def test_statistics_and_commands():
    assert h.rotated([1, 2, 3], 4) == [2, 3, 1]
    assert h.paired([2.0, None, 9.0], [1.0, 1.0, 3.0]) == 2.5
    assert h.ratio(1.0, 0) is None and h.median([None, 3, 1]) == 2
    assert h.strict_json({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}
    cmd = h.train_cmd({"algo": "sync", "period": None, "keep-training": False, "no-verify": True})
    assert cmd[-4:] == ["train", "--algo", "sync", "--no-verify"]


def test_table_and_options():
    assert h.table(["a", "b", "c"], [[1, "x", 2.5]], "lr") == [
        "| a | b | c |", "|---|---:|---:|", "| 1 | x | 2.5 |"
    ]  # fmt: skip
    p = argparse.ArgumentParser()
    h.options(p, ("--n", 2), ("--x", 0.5), ("--flag", False), ("--s", None), h.OUT)
    a = p.parse_args(["--n", "3", "--x", "1", "--flag"])
    assert (a.n, a.x, a.flag, a.s, a.out) == (3, 1.0, True, None, "benchmarks/results")


def test_quietest_keeps_the_least_disturbed_attempt(monkeypatch):
    readings = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(h.Foreign, "cores", lambda self: next(readings))
    tries = iter(range(3))
    res = h.quietest(lambda: {"n": next(tries)}, 2, 0.5, 0, "x", "others")
    assert (res["n"], res["others"], res["attempts"], res["kept_attempt"]) == (1, 1.0, 3, 2)
    assert h.quietest(lambda: {"error": "rc 1"}, 2, 0.5, 0, "x", "others")["attempts"] == 1


def fake_run(sps: float, hosts=None) -> dict:
    return {"samples_per_s": sps, "aggregate_samples_per_s": sps, "time_to_target_s": 2.0,
            "train_to_target_s": 1.5, "setup_s": 0.5, "final_test_acc": 0.9, "wall_s": 3.0,
            "job_s": 4.0, "others_cores": 0.0, "wait_share": [0.1, 0.2],
            "averaging_rounds": 5, "load_before": 1.0, "hosts": hosts or []}  # fmt: skip


@pytest.mark.parametrize("nodes", [0, 2])
def test_compare_goals_and_tables(nodes):
    args = compare.parse(["--nodes", str(nodes)] if nodes else ["--no-straggler"])
    variants = [("even", "No straggler")]
    if nodes:
        variants = [("uncapped", "Uncapped"), ("one-capped", "n2 capped")]
    runs = {f"{c}|{v}": [fake_run(100.0 if v != "one-capped" else 40.0, ["n1", "n2"])]
            for c in args.contenders for v, _ in variants}  # fmt: skip
    versions = {"cpu": "x", "torch": "2", "python": "3", "mpi4py": "4", "mpi_library": "MPI"}
    report = {"command": "c", "args": vars(args), "date": "d", "hostname": "h", "nproc": 2,
              "load_before": [1.0], "load_after": [1.0], "wall_s": 1.0, "versions": versions,
              "ranks": nodes or 2, "node_names": ["n1", "n2"], "hosts": ["n1", "n2"],
              "variants": variants, "round_bytes": 4e5, "ring_bytes": 4e5, "threads_per_rank": 1,
              "input_shape": [1, 8, 8], "steps_per_rank": 10, "contenders": args.contenders,
              "load_median_runs": 1.0, "runs": runs,
              "results": {k: compare.summarise(v) for k, v in runs.items()}}  # fmt: skip
    report["goals"] = compare.goals(report)
    md = compare.markdown(report)
    if nodes:
        sync = next(g for g in report["goals"] if g["goal"].startswith("one-capped: sync"))
        assert sync["value"] == pytest.approx(0.4) and sync["met"]
        assert "## Capped / uncapped (ratios of medians)" in md
    else:
        la = next(g for g in report["goals"] if "2.5x torch DDP" in g["goal"])
        assert la["value"] == 1.0 and not la["met"] and la["paired"] == 1.0
    assert "| contender | samples/s | aggregate samples/s | wall to 0.9 (s) |" in md


def test_outer_goals_from_made_up_runs():
    """outer.py's goals: the outer step's time to target at K = 32, DiLoCo's samples/s, and the
    bf16 round time on capped links, as measured and as capped minus uncapped."""
    import outer

    args = outer.parse(["--nodes", "4"])
    runs = {}
    for name in args.contenders:
        for k in args.periods:
            sps = 100.0 if name == "torchft-diloco" else 130.0
            tt = 2.0 if name.endswith("+outer") else 3.0
            runs[f"ranks|uncapped|K{k}|{name}"] = [{"samples_per_s": sps, "train_to_target_s": tt}]
    for link, base in (("uncapped", 80.0), ("all-capped", 180.0)):
        for name in args.node_contenders:  # bf16 halves what the link adds: 100 ms -> 50 ms
            ms = base if "+bf16" not in name else (80.0 if link == "uncapped" else 130.0)
            acc = 0.95 if "+bf16" not in name else 0.947
            runs[f"nodes|{link}|K32|{name}"] = [{"round_ms": ms, "final_test_acc": acc}]
    report = {"args": vars(args), "runs": runs,
              "results": {k: outer.summarise(v) for k, v in runs.items()}}  # fmt: skip
    goals = {g["goal"]: g for g in outer.goals(report)}
    assert goals["K = 32: local-sgd with the outer step reaches 0.9 in <= 0.8x plain's training "
                 "time"]["value"] == pytest.approx(2 / 3)  # fmt: skip
    diloco = goals["K = 128: lasgd+outer samples/s >= 1.2x torchft DiLoCo's"]
    assert diloco["value"] == pytest.approx(1.3) and diloco["met"]
    raw = goals["capped, K = 32: local-sgd bf16 round time <= 0.55x fp32's"]
    assert raw["value"] == pytest.approx(130 / 180) and not raw["met"]
    wire = goals["capped, K = 32: local-sgd bf16 round time minus uncapped <= 0.55x fp32's (what "
                 "the link adds)"]  # fmt: skip
    assert wire["value"] == pytest.approx(0.5) and wire["met"]
    acc = goals["capped, K = 32: local-sgd bf16 final accuracy within 0.5 points of fp32's"]
    assert acc["value"] == pytest.approx(-0.003) and acc["met"]
