"""The driver's loop in process, against a recording synchroniser: event order, the end-of-run
protocol, checkpoint and resume (world size 1, the same code path as every rank of a job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_asgd.config import Config
from hpc_asgd.env import detect
from hpc_asgd.errors import Preempted
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync import Periodic
from hpc_asgd.train import run

CALLS: list[tuple] = []


@SYNCHRONIZERS.register("recording")
class Recording(Periodic):
    """local-sgd's schedule (a blocking round every K steps), recording the driver's calls."""

    def start(self) -> None:
        CALLS.append(("start",))
        super().start()

    def next_stop(self, step: int) -> int:
        return step + self.period

    def step_done(self, step: int) -> None:
        CALLS.append(("round", step))
        self.rounds += 1

    def drain(self, step: int) -> None:
        CALLS.append(("drain", step))

    def final_average(self) -> None:
        CALLS.append(("finish",))
        super().final_average()

    def quiesce(self, step: int) -> None:
        CALLS.append(("quiesce", step))


def _run(tmp_path: Path, **flags) -> dict:
    values = {"algo": "recording", "period": 5, "epochs": 2.0, "eval_every": 1.0}
    values |= {"out": str(tmp_path / "out"), "comm": "local"} | flags
    CALLS.clear()
    return run(Config.from_flat(values), detect({}))


def test_rounds_then_drain_then_finish_before_the_final_evaluation(tmp_path) -> None:
    s = _run(tmp_path)
    total = s["steps_per_rank"]  # 2 epochs of the digits training set: 44 batches of 32 each
    assert total == 88
    rounds = [c[1] for c in CALLS if c[0] == "round"]
    assert rounds == list(range(5, total + 1, 5))  # every K steps, through the last
    assert CALLS[0] == ("start",) and CALLS[-2:] == [("drain", total), ("finish",)]
    assert s["averaging_rounds"] == len(rounds) and len(s["workers"]["steps"]) == 1
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1.0, 2.0]


def test_a_checkpoint_stops_and_the_resumed_run_keeps_the_schedule(tmp_path) -> None:
    ck = str(tmp_path / "ck")
    with pytest.raises(Preempted) as stop:
        _run(tmp_path, checkpoint_dir=ck, stop_at_step=33)
    assert stop.value.step == 33
    first = list(CALLS)
    assert ("quiesce", 33) in first and ("finish",) not in first  # saved mid-run, not ended
    assert [c[1] for c in first if c[0] == "round"] == list(range(5, 33, 5))
    straight = _run(tmp_path / "straight")
    s = _run(tmp_path, checkpoint_dir=ck, resume="auto")
    # the resumed run takes the rounds after step 33 only, then ends as a straight run does
    assert [c[1] for c in CALLS if c[0] == "round"] == list(range(35, 89, 5))
    assert CALLS[-2:] == [("drain", 88), ("finish",)]
    assert s["averaging_rounds"] == straight["averaging_rounds"]
    assert s["param_checksums"] == straight["param_checksums"]  # W = 1: bitwise the same
