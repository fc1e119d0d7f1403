"""The template side of preemption, on the real cluster, with a stand-in for the training CLI.

``scancel --signal=USR1 --batch JOB`` reaches only the batch shell; slurm/common.sh must forward
it through the launcher (srun or mpirun) to every rank, and when the ranks exit 85
("checkpointed, please requeue") run ``scontrol requeue`` once, within MAX_RESTARTS. The stand-in
(tests/slurm/helpers.py FAKE_CLI) records each start, waits for USR1 and exits 85. The training
side (checkpoints, --resume) is tested elsewhere with the real CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm.helpers import (
    REQUEUE_EXIT,
    Cluster,
    Job,
    Submission,
    job_env,
    run,
    wait_for,
    write_fake_cli,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# A requeued job may start again after cred_expire (30 s in scripts/slurm_local.sh's slurm.conf).
DEADLINE = 240.0


@dataclass
class Case:
    launcher: str
    env: dict[str, str]
    array: bool = False


CASES = {
    "mpirun": Case("mpirun", {}),
    "srun": Case("srun", {}),
    "array": Case("mpirun", {}, array=True),
    "cap": Case("mpirun", {"MAX_RESTARTS": "0"}),
}


@dataclass
class Preempted:
    job: Job
    out: Path
    ref: str  # what scancel and scontrol name the job by


@pytest.fixture(scope="module")
def preempted(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("slurm-requeue")
    fake = write_fake_cli(base / "bin")
    subs: dict[str, tuple[Submission, Path]] = {}
    for name, case in CASES.items():
        if case.launcher == "srun" and not slurm_cluster.pmix:
            continue
        out = base / f"out-{name}"
        env = {
            "PATH": f"{fake}:{job_env()['PATH']}",
            "LAUNCHER": case.launcher,
            "OUT_DIR": str(out),
            "FAKE_SECONDS": "120",
            "FAKE_RESTART_SECONDS": "1",
            **case.env,
        }
        args = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
        if case.array:
            args.append("--array=0")
        subs[name] = (
            Submission("cifar10_hier_avg.sh", base / f"{name}.out", sbatch_args=args, env=env),
            out,
        )
    results = {}
    for name, (sub, out) in subs.items():
        ref = f"{sub.job_id}_0" if CASES[name].array else sub.job_id
        # Both ranks are up (and have installed their USR1 handler): preempt the batch shell.
        wait_for(
            lambda o=out: (o / "ready.0.0").exists() and (o / "ready.1.0").exists(),
            120,
            f"both ranks of {name} to start",
        )
        proc = run(["scancel", "--signal=USR1", "--batch", ref], timeout=30)
        assert proc.returncode == 0, proc.stderr
        results[name] = (sub, out, ref)
    return {
        name: Preempted(sub.result(DEADLINE), out, ref) for name, (sub, out, ref) in results.items()
    }


def get(preempted: dict, name: str) -> Preempted:
    if name not in preempted:
        pytest.skip(f"{name}: srun --mpi=pmix does not start the venv's MPI here")
    return preempted[name]


@pytest.mark.parametrize("name", ["mpirun", "srun", "array"])
def test_usr1_reaches_every_rank_and_the_job_is_requeued_once(preempted: dict, name: str) -> None:
    p = get(preempted, name)
    text = p.job.text
    assert p.job.rc == 0, p.job.describe()
    assert p.job.state == "COMPLETED" and p.job.info.get("Restarts") == "1", p.job.describe()
    for rank in (0, 1):
        assert (p.out / f"usr1.{rank}.0").exists(), f"rank {rank} never got USR1\n{text}"
        assert (p.out / f"ready.{rank}.1").exists(), f"rank {rank} did not run again\n{text}"
        assert not (p.out / f"usr1.{rank}.1").exists()
    assert text.count("got SIGUSR1: forwarding it to the launcher") == 1, text
    assert text.count(f"checkpointed (exit 85): scontrol requeue {p.ref} (restart 1/3)") == 1, text
    assert "restart 1/3" in text and text.count("launcher exited with status 0") == 1, text
    # The restarted run resumes from the job's own checkpoint folder.
    argv = json.loads((p.out / "ready.0.1").read_text())["argv"]
    i = argv.index("--resume")
    assert argv[i : i + 4] == ["--resume", "auto", "--checkpoint-dir", f"{p.out}/checkpoints"]


def test_restart_cap_stops_requeueing(preempted: dict) -> None:
    p = get(preempted, "cap")
    assert p.job.rc == REQUEUE_EXIT, p.job.describe()
    assert p.job.state == "FAILED" and p.job.exit_code == f"{REQUEUE_EXIT}:0", p.job.describe()
    assert p.job.info.get("Restarts") == "0"
    assert "MAX_RESTARTS=0): not requeueing" in p.job.text, p.job.text
