"""The SLURM commands of README.md and docs/ run as written, on the emulated cluster.

A fenced ```bash block right after ``<!-- runnable on the emulated cluster -->`` is run with
``bash -euo pipefail`` in a fresh folder under /var/tmp (every emulated node sees it, as a
checkout on a shared home), where the repository's ``slurm/``, ``scripts/``, ``configs/``,
``examples/`` and ``.venv`` are linked so that the commands, written for the repository root,
find them. ``./data`` holds a small CIFAR-10 and CIFAR-100 in the official pickle format (the
real ones are not downloadable here); these bytes are not the releases', whose checksums the
loader checks, so the block's environment has ``EXTRA_ARGS=--no-verify``. The block's
``sbatch`` calls return at once; the test then waits for every job they submitted, and each must
end COMPLETED with exit code 0 and a ``summary.json`` in its output folder. ``sudo`` is the
identity for root (the tests run as root; the CI machine has no sudo installed).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.slurm.helpers import Cluster, job_env, job_info, run, write_cifar10, write_cifar100
from tests.unit.test_docs import run_block, runnable_blocks

MARK = "<!-- runnable on the emulated cluster -->"
BLOCKS = runnable_blocks(MARK)
LINKED = ("slurm", "scripts", "configs", "examples", ".venv")
BLOCK_TIMEOUT = 300  # seconds: the block itself (srun and mpirun wait for their runs)
JOBS_TIMEOUT = 300  # seconds: then every job it submitted
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_the_readme_and_the_slurm_page_have_cluster_blocks() -> None:
    pages = {where.split(":")[0] for where, _ in BLOCKS}
    assert {"README.md", "docs/slurm.md"} <= pages, pages
    for where, script in BLOCKS:
        assert "sbatch" in script or "srun" in script, f"{where}: no SLURM command in the block"
        assert "slurm_local.sh stop" not in script, f"{where}: the other tests need the cluster"


def _wait_done(job_id: str, deadline: float) -> dict[str, str]:
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in DONE:
            return info
        time.sleep(1)
    run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} not done after {JOBS_TIMEOUT} s: {info}")
    return info


@pytest.mark.timeout(BLOCK_TIMEOUT + JOBS_TIMEOUT + 120)
@pytest.mark.parametrize("script", [pytest.param(s, id=where) for where, s in BLOCKS])
def test_cluster_commands_run_as_written(
    script: str, slurm_cluster: Cluster, tmp_path: Path
) -> None:
    for name in LINKED:
        if (ROOT / name).exists():
            (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    # 64 images per batch: 320 train images, a 160-image shard per rank at 2 ranks, more than
    # the preset's batch of 128
    write_cifar10(tmp_path / "data", per_batch=64, n_test=32)
    write_cifar100(tmp_path / "data", n_train=320, n_test=32)
    shims = tmp_path / "shims"
    shims.mkdir()
    sudo = shims / "sudo"
    sudo.write_text('#!/bin/sh\n[ "$(id -u)" -eq 0 ] || exit 1\nexec "$@"\n')
    sudo.chmod(0o755)
    env = job_env({"PYTHONPATH": str(ROOT), "EXTRA_ARGS": "--no-verify"})
    env["PATH"] = f"{shims}:{env['PATH']}"
    out = run_block(script, tmp_path, env, BLOCK_TIMEOUT)
    jobs = re.findall(r"^Submitted batch job (\d+)$", out, re.MULTILINE)
    assert len(jobs) == script.count("sbatch "), f"not every sbatch submitted a job:\n{out}"
    deadline = time.monotonic() + JOBS_TIMEOUT
    for job_id in jobs:
        info = _wait_done(job_id, deadline)
        log = Path(info.get("StdOut", ""))
        text = log.read_text(errors="replace") if log.is_file() else "(no log)"
        assert (info["JobState"], info.get("ExitCode")) == ("COMPLETED", "0:0"), (
            f"job {job_id}: {info}\n{text[-4000:]}"
        )
        name = info["JobName"]
        summary = tmp_path / "runs" / f"{name}-{job_id}" / "summary.json"
        assert summary.is_file(), f"job {job_id}: no {summary}\n{text[-4000:]}"
        assert json.loads(summary.read_text())["world_size"] >= 1
    for out_dir in re.findall(r"--out (runs/\w+)", script):  # srun and mpirun's own runs
        summary = json.loads((tmp_path / out_dir / "summary.json").read_text())
        assert summary["world_size"] == 4 and summary["consensus"], summary
