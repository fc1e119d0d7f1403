"""Preemption end to end with the real CLI on the real cluster: submit, USR1 to the batch shell
(``scancel --signal=USR1 --batch``), the ranks agree and commit a checkpoint, the job requeues
itself once, resumes from the checkpoint and finishes with the step count of a straight run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.slurm.helpers import Cluster, Submission, job_env, run, wait_for, write_cifar100

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

TWO_RANKS = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]
EPOCHS = 1200  # 64 training images, 2 ranks, batch 8: 4 node steps per epoch, 4,800 in all


def _env(data: Path, out: Path) -> dict[str, str]:
    return job_env(
        {
            "LAUNCHER": "mpirun",
            "DATA_DIR": str(data),
            "OUT_DIR": str(out),
            "EPOCHS": str(EPOCHS),
            "MODEL": "mlp",
            "CHECK_EVERY": "20",
            "EXTRA_ARGS": "--no-verify --batch-size 8 --lr 0.05 --eval-every 200",
        }
    )


def test_usr1_checkpoint_requeue_resume(slurm_cluster: Cluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_cifar100(data, n_train=64, n_test=16)
    straight_out, preempted_out = tmp_path / "straight", tmp_path / "preempted"
    straight = Submission(
        "cifar100_lasgd.sh",
        tmp_path / "straight.log",
        sbatch_args=TWO_RANKS,
        env=_env(data, straight_out),
    )
    job = Submission(
        "cifar100_lasgd.sh",
        tmp_path / "preempted.log",
        sbatch_args=TWO_RANKS,
        env=_env(data, preempted_out),
    )
    # Training is under way once the first evaluation is written; then preempt the batch shell.
    wait_for((preempted_out / "metrics.jsonl").exists, 240, "the job to train")
    sig = run(["scancel", "--signal=USR1", "--batch", job.job_id], timeout=30)
    assert sig.returncode == 0, sig.stderr
    done = job.result(360)
    assert done.rc == 0 and done.state == "COMPLETED", done.describe()
    assert done.info.get("Restarts") == "1", done.describe()  # requeued exactly once
    assert "checkpointed at node step" in done.text, done.describe()
    ckpts = [
        p for p in (preempted_out / "checkpoints").glob("step-*") if (p / "manifest.json").exists()
    ]
    assert ckpts, "no committed checkpoint"
    ref = straight.result(360)
    assert ref.rc == 0, ref.describe()
    a = json.loads((straight_out / "summary.json").read_text())
    b = json.loads((preempted_out / "summary.json").read_text())
    assert b["steps_per_rank"] == a["steps_per_rank"] == math.ceil(EPOCHS * 4)
    assert b["consensus"] and b["world_size"] == 2
    assert len(set(b["hosts"])) == 2, b["hosts"]  # across two nodes, before and after the requeue
