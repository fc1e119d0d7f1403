"""A node lost while a 2-node job trains (sbatch, one rank per node, checkpoints on):

(a) every process of one node is killed (its slurmd, the job's step daemon and rank), over Gloo
    and over MPI with Open MPI's fault tolerance (ULFM) switched on: without it, Open MPI ends
    the survivors itself at once, naming only the peer's host;
(b) the node's slurmd is killed (Slurm marks the node down and requeues the job itself);
(c) the node's link goes down (its rank and daemons live on, unreachable).

In (a) and (c) the surviving rank ends within ``--comm-timeout`` + 10 s with one line naming the
missing rank and its host; in every case no process of the job is left on any node, and the
requeued job resumes from the last committed checkpoint and finishes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.helpers import (
    SLURM_LOCAL,
    Cluster,
    Submission,
    job_info,
    node_states,
    run,
    wait_for,
    write_cifar100,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TIMEOUT = 10  # --comm-timeout of the job, seconds
EPOCHS = 150  # 64 images, 2 ranks, batch 8: 4 node steps per epoch, 600 in all (seconds)
SLOW_EPOCHS = 3000  # (b): ~60 s; the job must outlive Slurm's verdict (SlurmdTimeout 15 s: ~29 s)


def _hostnames(nodelist: str) -> list[str]:
    return run(["scontrol", "show", "hostnames", nodelist]).stdout.split()


def _job_pids(node: str, job_id: str) -> list[int]:
    """The job's processes on ``node``: its step daemons and everything below them."""
    pids = [int(p) for p in run(["ip", "netns", "pids", node]).stdout.split()]
    parent, cmd = {}, {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    mine = {p for p, c in cmd.items() if c.startswith("slurmstepd") and f"[{job_id}." in c}
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in mine} - mine
        grew, mine = bool(more), mine | more
    return sorted(mine)


def _submit(tmp: Path, name: str, engine: str, epochs: int) -> tuple[Submission, Path]:
    data, out = tmp / "data", tmp / f"out-{name}"
    write_cifar100(data, n_train=64, n_test=16)
    env = {
        "LAUNCHER": "srun",
        "DATA_DIR": str(data),
        "OUT_DIR": str(out),
        "EPOCHS": str(epochs),
        "MODEL": "mlp",
        "ALGO": "local-sgd",
        "CHECKPOINT_EVERY": "20",
        "EXTRA_ARGS": f"--no-verify --batch-size 8 --lr 0.05 --eval-every 50 "
        f"--comm-timeout {TIMEOUT} --comm {engine.split('-', maxsplit=1)[0]}",
    }
    if engine == "mpi-ulfm":  # the wheel's Open MPI finds its own files through OPAL_PREFIX
        env.update(OMPI_MCA_mpi_ft_enable="1", OPAL_PREFIX=str(Path(sys.executable).parents[1]))
    args = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]
    sub = Submission("cifar100_lasgd.sh", tmp / f"{name}.log", sbatch_args=args, env=env)
    return sub, out


def _committed(out: Path) -> list[int]:
    ckpt = out / "checkpoints"
    return sorted(
        int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if (p / "manifest.json").exists()
    )


def _restore_cluster() -> None:
    """Bring every node back (a restarted slurmd, a link up again) and wait until all are idle."""
    for n in range(1, 5):
        subprocess.run(["ip", "link", "set", f"hv-node{n}", "up"], check=False)
    proc = run(["bash", str(SLURM_LOCAL), "start", "--nodes", "4"], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _state(job_id: str) -> str:
    return job_info(job_id).get("JobState", "")


FAULTS = [
    ("kill-processes", "gloo"),
    ("kill-processes", "mpi-ulfm"),
    ("kill-slurmd", "mpi"),
    ("link-down", "mpi"),
]


@pytest.mark.parametrize(("fault", "engine"), FAULTS, ids=[f"{f}-{e}" for f, e in FAULTS])
def test_node_lost_while_training(cluster: Cluster, tmp_path: Path, fault: str, engine: str):
    epochs = SLOW_EPOCHS if fault == "kill-slurmd" else EPOCHS
    sub, out = _submit(tmp_path, fault, engine, epochs)
    job_id = sub.job_id
    try:
        # Training is under way and a checkpoint is committed: then the second node goes.
        wait_for(lambda: _committed(out), 240, "a committed checkpoint")
        victim = _hostnames(job_info(job_id)["NodeList"])[1]
        first_run = [p for n in range(1, 5) for p in _job_pids(f"node{n}", job_id)]
        slurmd = Path(f"/run/slurm/slurmd-{victim}.pid").read_text().strip()
        t0 = time.monotonic()
        if fault == "kill-processes":  # the node crashes: its slurmd, step daemons and rank
            pids = _job_pids(victim, job_id)
            assert pids, f"no process of job {job_id} on {victim}"
            run(["kill", "-9", slurmd, *map(str, pids)])
        elif fault == "kill-slurmd":
            run(["kill", "-9", slurmd])
        else:
            run(["ip", "link", "set", f"hv-{victim}", "down"])
        if fault == "kill-slurmd":
            # the ranks go on; Slurm marks the node down after SlurmdTimeout (15 s)
            wait_for(lambda: "down" in node_states().get(victim, ""), 120, f"{victim} down")
        else:
            # the surviving rank names the missing one within the deadline (+ 10 s)
            named = re.compile(rf"rank\(s\) 1 \({victim}\) did not (arrive|answer)")
            wait_for(
                lambda: named.search(sub.output.read_text(errors="replace")),
                TIMEOUT + 10,
                f"the surviving rank to name rank 1 ({victim})",
            )
            assert time.monotonic() - t0 < TIMEOUT + 10
        step = _committed(out)[-1]
        if fault == "link-down":
            run(["ip", "link", "set", f"hv-{victim}", "up"])
        # no process of the first run is left on any node
        wait_for(
            lambda: not any(Path(f"/proc/{p}").exists() for p in first_run),
            90,
            "the job's processes to end on every node",
        )
        _restore_cluster()
        # Slurm requeues the job itself when it saw the node fail (a, b); a job that merely
        # failed (c) is requeued by its operator. Either way it resumes from the checkpoint.
        requeued = False
        deadline = time.monotonic() + 400
        while (info := job_info(job_id)).get("JobState") != "COMPLETED":
            assert time.monotonic() < deadline, info
            ended = info.get("JobState") in ("FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT")
            if ended and info.get("Restarts") == "0" and not requeued:
                req = run(["scontrol", "requeue", job_id])
                assert req.returncode == 0, req.stderr
                requeued = True
            else:
                assert not (ended and info.get("Restarts") != "0"), info
            time.sleep(1)
    finally:
        if _state(job_id) in ("RUNNING", "PENDING", "REQUEUED"):
            run(["scancel", job_id])
        sub.proc.kill()  # sbatch --wait, if still waiting
        _restore_cluster()
    info = job_info(job_id)
    log = sub.output.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, log)
    assert f"resuming from node step {step}" in log, log
    s = json.loads((out / "summary.json").read_text())
    assert s["steps_per_rank"] == epochs * 4 and s["consensus"], s
