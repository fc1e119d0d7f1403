"""Injected delays on real ranks: random per-step delays everywhere and one rank's pause run
to the end with consensus; the summary reports the averager's and the workers' CPU time."""

from __future__ import annotations

import pytest

from tests.conftest import summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(150)]


@pytest.mark.parametrize("budget", ["job", "rank"])
def test_random_delays_and_a_pause_with_workers(tmp_path, budget: str) -> None:
    """local-async (one spawned worker per rank): rank 1's worker pauses 1 s after node step
    10; every step of both ranks sleeps ~2 ms more. With the job's budget rank 0 takes the
    paused rank's share meanwhile; with fixed steps per rank the job waits for the pause."""
    flags = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--algo", "local-async"]
    flags += ["--period", "4", "--delay", "exp:2", "--pause-rank", "1", "--pause-at", "10"]
    flags += ["--budget", budget, "--pause-s", "1", "--out", str(tmp_path)]
    res = train(2, *flags, timeout=120)
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    assert s["consensus"] and s["averaging_rounds"] >= 1, s
    total, taken = s["steps_per_rank"], s["steps_taken"]
    if budget == "job":  # rank 0 trains on through the pause; rank 1 stops short
        assert taken[0] > total > taken[1] and sum(taken) >= 2 * total, s
    else:
        assert taken == [total, total] and s["train_s"][1] >= 1.0, s  # the pause is training
    assert all(x > 0 for x in s["worker_cpu_s"]), s["worker_cpu_s"]
    assert all(x is not None and x >= 0 for x in s["averager_cpu_s"]), s["averager_cpu_s"]
