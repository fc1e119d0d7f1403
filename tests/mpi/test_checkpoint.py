"""Checkpoint / resume / preemption with real ranks under mpirun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, assert_no_orphans, mpi_env, mpirun_exe, summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

RUN = [
    "--dataset",
    "digits",
    "--model",
    "cnn",
    "--lr",
    "0.02",
    "--momentum",
    "0.9",
    "--epochs",
    "3",
    "--algo",
    "local-sgd",
    "--period",
    "3",
]


def _committed(root) -> list[str]:
    return sorted(p.name for p in root.glob("step-*") if (p / "manifest.json").is_file())


def test_stop_and_resume_is_bitwise_equal_to_a_straight_run(tmp_path) -> None:
    """W = 1, fixed seed: N steps straight == k steps, checkpoint, resume to N (momentum, RNG
    of dropout and augmentation, data order, averaging schedule all restored)."""
    straight = train(2, *RUN, "--out", str(tmp_path / "straight"))
    assert straight.rc == 0, straight.text
    ck = tmp_path / "ck"
    first = train(
        2, *RUN, "--checkpoint-dir", str(ck), "--checkpoint-every", "20", "--stop-at-step", "50"
    )
    assert first.rc == 85, first.text
    assert "checkpointed at node step 50" in first.text
    assert _committed(ck) == ["step-000000040", "step-000000050"]  # the newest two are kept
    second = train(
        2, *RUN, "--checkpoint-dir", str(ck), "--resume", "auto", "--out", str(tmp_path / "resumed")
    )
    assert second.rc == 0, second.text
    a, b = summary(tmp_path / "straight"), summary(tmp_path / "resumed")
    assert a["param_checksums"] == b["param_checksums"]
    assert a["steps_per_rank"] == b["steps_per_rank"]
    rows = [
        json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]  # metrics carried across the restart


def test_killed_while_writing_resumes_from_the_previous_checkpoint(tmp_path) -> None:
    ck = tmp_path / "ck"
    crashed = train(
        2,
        *RUN,
        "--checkpoint-dir",
        str(ck),
        "--checkpoint-every",
        "20",
        env={"HPC_ASGD_FAULT": "ckptkill@0:40"},
    )
    assert crashed.rc != 0
    assert_no_orphans(crashed.sid)
    assert (ck / "step-000000040").is_dir()  # written, never committed
    assert _committed(ck) == ["step-000000020"]
    resumed = train(
        2, *RUN, "--checkpoint-dir", str(ck), "--resume", "auto", "--out", str(tmp_path / "resumed")
    )
    assert resumed.rc == 0, resumed.text
    straight = train(2, *RUN, "--out", str(tmp_path / "straight"))
    assert straight.rc == 0, straight.text
    assert (
        summary(tmp_path / "resumed")["param_checksums"]
        == summary(tmp_path / "straight")["param_checksums"]
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_usr1_checkpoints_then_exits_for_requeue(tmp_path, workers: str) -> None:
    """USR1 to mpirun reaches the ranks; they agree, checkpoint and exit 85; resume finishes."""
    ck = tmp_path / "ck"
    flags = [
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "400",
        "--batch-size",
        "8",
        "--workers",
        workers,
        "--checkpoint-dir",
        str(ck),
        "--check-every",
        "20",
    ]
    cmd = [
        mpirun_exe(),
        "-n",
        "2",
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        "-m",
        "hpc_asgd.cli",
        "train",
        *flags,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=mpi_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(12)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 85, out + err
    assert "checkpointed at node step" in err
    assert_no_orphans(proc.pid)
    step = int(_committed(ck)[-1].split("-")[1])
    # The requeued job resumes there (and here stops again 20 node steps later).
    res = train(2, *flags, "--resume", "auto", "--stop-at-step", str(step + 20))
    assert res.rc == 85, res.text
    assert f"checkpointed at node step {step + 20}" in res.text
