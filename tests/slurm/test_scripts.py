"""The SLURM scripts without a cluster: shellcheck, the templates' contract, the per-rank GPU
binding, the signal plumbing of slurm/common.sh outside SLURM, and the study's dry run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, summary
from tests.slurm.helpers import REQUEUE_EXIT, TEMPLATES, job_env, wait_for, write_fake_cli

pytestmark = pytest.mark.timeout(120)

TEMPLATE_NAMES = [
    "cifar100_lasgd",
    "cifar10_local_async",
    "cifar10_hier_avg",
    "imagenet_local_async",
    "mnist_leashed",
]
SHELL_SCRIPTS = sorted([*TEMPLATES.glob("*.sh"), *(ROOT / "scripts").glob("*.sh")])


def test_every_template_is_there() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.sh")) == sorted([*TEMPLATE_NAMES, "common"])


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_shellcheck_clean() -> None:
    proc = subprocess.run(
        ["shellcheck", "-x", *map(str, SHELL_SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_contract(name: str) -> None:
    text = (TEMPLATES / f"{name}.sh").read_text()
    sbatch = [ln.split()[1] for ln in text.splitlines() if ln.startswith("#SBATCH")]
    opts = {s.split("=")[0] for s in sbatch}
    for opt in (
        "--job-name",
        "--nodes",
        "--ntasks-per-node",
        "--cpus-per-task",
        "--time",
        "--signal",
        "--requeue",
        "--output",
    ):
        assert opt in opts, f"{name}: no #SBATCH {opt}"
    assert "--signal=B:USR1@120" in sbatch
    assert "--gpus-per-task" not in text  # its cgroup isolation breaks CUDA IPC
    assert "set -euo pipefail" in text
    assert 'source "$here/common.sh"' in text
    assert "SLURM_SUBMIT_DIR" in text and "HPC_ASGD_HOME" in text
    assert text.count("hpc_asgd_run ") >= 1
    assert ': "${ALGO:=' in text or "${ALGO:=" in text


def rank_exec(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [
            "bash",
            str(TEMPLATES / "common.sh"),
            "--rank-exec",
            "sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES",
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        timeout=30,
        check=True,
    )
    return proc.stdout.strip()


def test_rank_binding_one_gpu_per_local_rank() -> None:
    assert rank_exec({"SLURM_LOCALID": "3"}) == "3"
    # The job's GPUs (--gres sets CUDA_VISIBLE_DEVICES): the local rank picks among them.
    assert rank_exec({"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "4,5,6"}) == "5"
    # Under mpirun inside an allocation the batch step's SLURM_LOCALID (0) is stale.
    assert rank_exec({"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}) == "2"
    assert (
        rank_exec({"SLURM_LOCALID": "1", "GPU_BIND": "none", "CUDA_VISIBLE_DEVICES": "0,1"})
        == "0,1"
    )


def test_template_runs_without_slurm(tmp_path: Path) -> None:
    """`bash slurm/x.sh` outside SLURM: one rank under mpirun, per-template flags, outputs."""
    env = job_env(
        {
            "LAUNCHER": "mpirun",
            "DATASET": "digits",
            "MODEL": "mlp",
            "ALGO": "local-sgd",
            "EPOCHS": "0.2",
            "OUT_DIR": str(tmp_path / "out"),
            "EXTRA_ARGS": "--batch-size 16 --lr 0.05",
        }
    )
    proc = subprocess.run(
        ["bash", str(TEMPLATES / "cifar100_lasgd.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--period 8" in proc.stdout and "--batch-size 16" in proc.stdout
    s = summary(tmp_path / "out")
    assert (s["algo"], s["dataset"], s["world_size"]) == ("local-sgd", "digits", 1)
    assert s["final_test_acc"] is not None


@pytest.mark.parametrize("launcher", ["mpirun", "direct"])
def test_usr1_reaches_the_ranks_and_85_is_passed_on(tmp_path: Path, launcher: str) -> None:
    """The batch shell forwards USR1 to the launcher, which relays it to the ranks (no SLURM)."""
    fake = write_fake_cli(tmp_path / "bin")
    env = job_env(
        {
            "PATH": f"{fake}:{job_env()['PATH']}",
            "LAUNCHER": "mpirun",
            "OUT_DIR": str(tmp_path / "out"),
            "FAKE_SECONDS": "60",
            "EXTRA_ARGS": "--checkpoint-every 5",
            "CHECKPOINT_EVERY": "100",
        }
    )
    if launcher == "direct":  # no launcher: the batch shell signals the rank itself
        env["LAUNCHER"] = "none"
    proc = subprocess.Popen(
        ["bash", str(TEMPLATES / "cifar10_hier_avg.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        wait_for((tmp_path / "out" / "ready.0.0").exists, 60, "the fake rank")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == REQUEUE_EXIT, out
    assert (tmp_path / "out" / "usr1.0.0").exists(), out
    assert "got SIGUSR1" in out and "outside Slurm: nothing to requeue" in out
    # The CLI lists --resume: the template asked for a resumable run in the job's folder.
    assert f"--resume auto --checkpoint-dir {tmp_path}/out/checkpoints" in out
    assert "--checkpoint-every 100" in out


def test_a_launcher_exit_0_without_a_summary_is_a_failure(tmp_path: Path) -> None:
    """Open MPI's mpirun exits 0 after it ended the ranks itself on losing a node's daemon (seen
    on the emulated cluster): the job must not read as done. A stale summary.json of an earlier
    run in the same folder does not count either."""
    fake = write_fake_cli(tmp_path / "bin")
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "summary.json"
    stale.write_text("{}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    env = job_env(
        {
            "PATH": f"{fake}:{job_env()['PATH']}",
            "LAUNCHER": "none",
            "OUT_DIR": str(tmp_path / "out"),
            "FAKE_SECONDS": "0",
            "FAKE_NO_SUMMARY": "1",
        }
    )
    proc = subprocess.run(
        ["bash", str(TEMPLATES / "mnist_leashed.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpc-asgd: error")]
    assert "exited with status 0 but this run wrote no" in line and "summary.json" in line
    env.pop("FAKE_NO_SUMMARY")  # the same run writing its summary succeeds
    proc = subprocess.run(
        ["bash", str(TEMPLATES / "mnist_leashed.sh")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("knobs", "workers", "threads", "gpu"),
    [
        ({"SLURM_CPUS_PER_TASK": "4"}, "4", "1", None),  # one worker per core
        ({"SLURM_CPUS_PER_TASK": "4", "WORKERS": "2"}, "2", "2", None),
        ({"SLURM_CPUS_PER_TASK": "4", "RANKS_PER": "gpu"}, "1", "4", "0"),  # a rank per GPU
    ],
)
def test_worker_thread_and_gpu_defaults(
    tmp_path: Path, knobs: dict[str, str], workers: str, threads: str, gpu: str | None
) -> None:
    fake = write_fake_cli(tmp_path / "bin")
    env = job_env(
        {
            "PATH": f"{fake}:{job_env()['PATH']}",
            "LAUNCHER": "none",
            "OUT_DIR": str(tmp_path / "out"),
            "FAKE_SECONDS": "0",
            **knobs,
        }
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        ["bash", str(TEMPLATES / "mnist_leashed.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "out" / "ready.0.0").read_text())
    argv = record["argv"]
    assert argv[argv.index("--workers") + 1] == workers, argv
    assert argv[argv.index("--update") + 1] == "leashed" and "none" in argv, argv
    assert record["env"]["OMP_NUM_THREADS"] == threads
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == gpu


def test_bad_knobs_fail_with_one_line(tmp_path: Path) -> None:
    for knob in ({"LAUNCHER": "qsub"}, {"RANKS_PER": "socket"}, {"WORKERS": "0"}, {"FABRIC": "x"}):
        env = job_env({"OUT_DIR": str(tmp_path / "o"), **knob})
        proc = subprocess.run(
            ["bash", str(TEMPLATES / "cifar10_hier_avg.sh")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1, (knob, proc.stdout, proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpc-asgd: error:")]
        assert len(errors) == 1 and next(iter(knob)) in errors[0], (knob, proc.stderr)


def test_scaling_study_dry_run(tmp_path: Path) -> None:
    def dry(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "scaling_study.py"), *args, "--dry-run"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = dry(
        "--template",
        str(TEMPLATES / "cifar10_hier_avg.sh"),
        "--nodes",
        "1",
        "2",
        "--algos",
        "local-sgd",
        "hier-avg",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--extra-args",
        "--lr 0.1,0.2",
        "--out-root",
        str(tmp_path / "s"),
        "--sbatch-arg=--time=30",
    )
    cmds = [ln for ln in out.splitlines() if " sbatch " in ln]
    assert len(cmds) == 4, out
    assert all("--time=30" in c and "WORKERS=2" in c and "EPOCHS=1" in c for c in cmds)
    assert sum("--nodes=2" in c for c in cmds) == 2
    assert "EXTRA_ARGS='--lr 0.1,0.2'" in cmds[0]
    assert not (tmp_path / "s").exists()  # a dry run writes nothing

    out = dry("--mode", "chain", "--algos", "sync", "local-sgd", "--out-root", str(tmp_path / "c"))
    cmds = [ln for ln in out.splitlines() if " sbatch " in ln]
    assert "--dependency" not in cmds[0] and "--dependency=afterany:" in cmds[1]

    out = dry("--mode", "array", "--ntasks-per-node", "1", "2", "--algos", "sync", "local-sgd")
    arrays = [ln for ln in out.splitlines() if ln.startswith("sbatch ")]
    assert len(arrays) == 2 and all("--array=0-1" in c for c in arrays), out
    assert "#SBATCH --signal=B:USR1@120" in out and "export ALGO=local-sgd" in out
