"""Checkpoint / resume / preemption with real ranks under mpirun."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

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


def _committed(root, run: str = "") -> list[int]:
    """Node steps of the committed checkpoints under ``root`` (of run ids starting ``run``)."""
    found = [p.name.split("-") for p in root.glob("step-*") if (p / "manifest.json").is_file()]
    return sorted(int(step) for _, step, rid in found if rid.startswith(run))


def _folder(root, step: int):
    (folder,) = root.glob(f"step-{step:09d}-*")
    return folder


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
    assert _committed(ck) == [40, 50]  # the newest two are kept
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
    assert _folder(ck, 40).is_dir()  # written, never committed
    assert _committed(ck) == [20]
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
    # USR1 once training runs (rank 0's first epoch line): one during start-up ends the job
    # before the first step, with nothing to checkpoint (test_nothing_lost.py)
    deadline, line = time.monotonic() + 90, ""
    while not line.startswith("epoch"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 85, out + err
    assert "checkpointed at node step" in err
    assert_no_orphans(proc.pid)
    step = _committed(ck)[-1]
    # The requeued job resumes there (and here stops again 20 node steps later).
    res = train(2, *flags, "--resume", "auto", "--stop-at-step", str(step + 20))
    assert res.rc == 85, res.text
    assert f"checkpointed at node step {step + 20}" in res.text


FAST = ["--dataset", "digits", "--model", "mlp", "--algo", "local-sgd", "--period", "3"]


def test_runs_sharing_a_folder_keep_to_their_own_checkpoints(tmp_path) -> None:
    """A and B (another lr and length) in one folder: B's retention spares A's checkpoints,
    B resumes only its own, A's is refused unless forced, and a complete B still reports."""
    ck = tmp_path / "ck"
    a = [*FAST, "--checkpoint-dir", str(ck), "--epochs", "3"]  # 22 node steps an epoch
    b = [*FAST, "--checkpoint-dir", str(ck), "--epochs", "2", "--lr", "0.01"]
    res = train(2, *a, "--checkpoint-every", "40")
    assert res.rc == 0, res.text
    assert _committed(ck) == [40, 66]  # the final state is committed too
    a_40 = _folder(ck, 40)
    a_id = a_40.name.split("-")[2]
    res = train(2, *b, "--checkpoint-every", "20", "--stop-at-step", "30")
    assert res.rc == 85, res.text
    assert _committed(ck) == [20, 30, 40, 66]  # B's own newest two and A's, all kept
    assert _committed(ck, a_id) == [40, 66]
    res = train(2, *b, "--resume", "auto", "--out", str(tmp_path / "b1"))
    assert res.rc == 0 and "resuming from node step 30" in res.text, res.text
    assert summary(tmp_path / "b1")["steps_per_rank"] == 44
    assert _committed(ck, a_id) == [40, 66]
    # Run again, B is found complete: no steps, but its outputs, the same ones.
    res = train(2, *b, "--resume", "auto", "--out", str(tmp_path / "b2"))
    assert res.rc == 0 and "resuming from node step 44" in res.text, res.text
    rows = (tmp_path / "b1" / "metrics.jsonl").read_text()
    assert (tmp_path / "b2" / "metrics.jsonl").read_text() == rows and len(rows.splitlines()) == 2
    assert (tmp_path / "b2" / "model.pt").is_file()
    s1, s2 = summary(tmp_path / "b1"), summary(tmp_path / "b2")
    assert s1["param_checksums"] == s2["param_checksums"]
    assert s1["final_test_acc"] == s2["final_test_acc"]
    # A's checkpoint named explicitly: refused with one line per rank, unless forced.
    res = train(2, *b, "--resume", str(a_40))
    lines = res.error_lines()
    assert res.rc != 0 and lines, res.text
    assert all(
        "another configuration's checkpoint" in ln and "--force-resume" in ln for ln in lines
    )
    assert "Traceback" not in res.text
    # Forced: A's final state goes on in a longer run (no W = 1 momentum or RNG state in it).
    longer = ["--epochs", "4", "--out", str(tmp_path / "a4"), "--force-resume"]
    res = train(2, *a, "--resume", str(_folder(ck, 66)), *longer)
    assert res.rc == 0 and "resuming from node step 66" in res.text, res.text
    assert summary(tmp_path / "a4")["steps_per_rank"] == 88


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unreadable_newest_falls_back_and_a_refused_file_is_one_error(tmp_path) -> None:
    ck = tmp_path / "ck"
    run = [*FAST, "--checkpoint-dir", str(ck), "--epochs", "2"]
    res = train(2, *run, "--checkpoint-every", "10", "--stop-at-step", "30")
    assert res.rc == 85, res.text
    bad = _folder(ck, 30) / "rank-00001.pt"  # rank 1's only: rank 0 reads its own fine
    bad.write_bytes(b"\x80\x02" + bytes(range(256)))
    res = train(2, *run, "--resume", "auto", "--out", str(tmp_path / "out"))
    assert res.rc == 0, res.text
    assert f"warning: rank 1: {bad}: not a valid checkpoint" in res.text
    assert "resuming from node step 20" in res.text  # both ranks went back
    assert summary(tmp_path / "out")["consensus"]
    newest = _folder(ck, 44)
    for rank in (0, 1):
        torch.save({"step": 44, "flat": _Evil()}, newest / f"rank-{rank:05d}.pt")
    res = train(2, *run, "--resume", str(newest))
    lines = res.error_lines()
    assert res.rc != 0 and lines, res.text
    assert all("not a valid checkpoint" in ln and str(newest) in ln for ln in lines), res.text
    assert "weights_only" not in res.text and "Traceback" not in res.text
    assert "pwned" not in res.text


def test_leashed_workers_with_checkpoints_end_in_consensus(tmp_path) -> None:
    """The final checkpoint publishes the update rule's latest version into the model: after
    the final exact average that version must be the average (it was this rank's own
    Leashed-SGD version, and the ranks' checksums differed: seen first across emulated nodes)."""
    flags = ["--dataset", "digits", "--model", "mlp", "--epochs", "4", "--algo", "lasgd"]
    flags += ["--period", "8", "--update", "leashed", "--workers", "2"]
    res = train(2, *flags, "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "out"))
    assert res.rc == 0, res.text
    s = summary(tmp_path / "out")
    assert s["consensus"] and len(set(s["param_checksums"])) == 1, s["param_checksums"]
