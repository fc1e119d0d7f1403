"""The outer optimizer and the 16-bit payload with real ranks: a checkpointed run resumes with
its outer state and residuals to the bits of a straight run (W = 1), every synchroniser with
an outer Nesterov step and a bf16 payload reaches accuracy with bitwise consensus, and a
setting refused is one line before any collective."""

from __future__ import annotations

import pytest

from tests.conftest import summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

# DiLoCo's outer step (lr 0.7, Nesterov momentum 0.9) over plain inner SGD: at K = 8 it took
# local-sgd on digits/cnn from 0.90 to 0.97 in 4 epochs (inner momentum 0.9 as well diverged)
RUN = [
    *("--dataset", "digits", "--model", "cnn", "--lr", "0.1"),
    *("--epochs", "4", "--algo", "local-sgd", "--period", "8"),
    *("--outer-lr", "0.7", "--outer-momentum", "0.9", "--outer-nesterov", "--avg-dtype", "bf16"),
]


def test_outer_state_and_residuals_resume_bitwise(tmp_path) -> None:
    straight = train(2, *RUN, "--out", str(tmp_path / "straight"))
    assert straight.rc == 0, straight.text
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    first = train(2, *RUN, *ck, "--stop-at-step", "30")
    assert first.rc == 85 and "checkpointed at node step 30" in first.text, first.text
    resumed = train(2, *RUN, *ck, "--resume", "auto", "--out", str(tmp_path / "resumed"))
    assert resumed.rc == 0, resumed.text
    a, b = summary(tmp_path / "straight"), summary(tmp_path / "resumed")
    assert a["param_checksums"] == b["param_checksums"] and a["consensus"]
    assert a["final_test_acc"] >= 0.9, a["final_test_acc"]


@pytest.mark.parametrize(
    "algo",
    [
        ["--algo", "lasgd", "--comm", "mpi"],
        ["--algo", "local-async", "--workers", "2", "--comm", "gloo"],
        ["--algo", "hier-avg", "--group-size", "1", "--local-period", "2", "--global-period", "4",
         "--hier-mode", "nonblocking", "--comm", "mpi"],
    ],
    ids=["lasgd-mpi", "local-async-gloo", "hier-avg-nb-mpi"],
)  # fmt: skip
def test_non_blocking_rounds_with_an_outer_step_and_a_bf16_payload(tmp_path, algo) -> None:
    out = tmp_path / "out"
    flags = [*RUN[: RUN.index("--algo")], "--period", "8", *RUN[RUN.index("--outer-lr") :]]
    res = train(2, *flags, *algo, "--out", str(out), timeout=180)
    assert res.rc == 0, res.text
    s = summary(out)
    assert s["consensus"] and s["averaging_rounds"] > 0, s
    assert s["final_test_acc"] >= 0.9, s["final_test_acc"]


def test_a_refused_setting_is_one_line_and_exit_2() -> None:
    res = train(2, "--algo", "sync", "--avg-dtype", "bf16", timeout=60)
    assert res.rc == 2, res.text
    assert res.error_lines() == [
        "hpc-asgd: error: avg_dtype: only for the model-averaging rounds "
        "(hier-avg, lasgd, local-async, local-sgd); 'sync' has none"
    ], res.text
