"""scripts/scaling_study.py on the real cluster: a 2 x 2 sweep as job arrays, gathered."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.slurm.helpers import TEMPLATES, Cluster, job_env

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def study(*args: str, timeout: float = 260) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "scaling_study.py"), *args],
        capture_output=True,
        text=True,
        env=job_env(),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def test_sweep_as_arrays_then_gather(slurm_cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "study"
    proc = study(
        "--template",
        str(TEMPLATES / "cifar10_hier_avg.sh"),
        "--nodes",  # a scaling study across emulated nodes: 1 and 2 nodes x 1 rank
        "1",
        "2",
        "--ntasks-per-node",
        "1",
        "--cpus-per-task",
        "1",
        "--algos",
        "sync",
        "local-sgd",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "0.5",
        "--extra-args",
        "--batch-size 16 --lr 0.05",
        "--export",
        "LAUNCHER=mpirun",
        "--export",
        "PRESET=",
        "--sbatch-arg=--time=10",
        "--mode",
        "array",
        "--out-root",
        str(root),
        "--wait",
        "--poll",
        "1",
        "--timeout",
        "240",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("submitted array") == 2, proc.stdout
    with (root / "study.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4, rows
    got = sorted((r["algo"], int(r["nodes"]), int(r["world_size"]), r["state"]) for r in rows)
    assert got == [
        ("local-sgd", 1, 1, "COMPLETED"),
        ("local-sgd", 2, 2, "COMPLETED"),
        ("sync", 1, 1, "COMPLETED"),
        ("sync", 2, 2, "COMPLETED"),
    ], rows
    for r in rows:
        assert float(r["samples_per_s"]) > 0 and 0 <= float(r["final_test_acc"]) <= 1, r
        assert r["workers"] == "1" and r["dataset"] == "digits" and float(r["wall_s"]) > 0, r
        if r["world_size"] == "1":
            assert float(r["speedup"]) == 1.0 and float(r["efficiency"]) == 1.0, r
    md = (root / "study.md").read_text().splitlines()
    assert md[0].startswith("| algo | update | nodes |") and len(md) == 6, md
    assert len(list((root / "logs").glob("*.out"))) == 4
    # ... and its plots, through hpc-asgd report's code: both series at 1 and 2 ranks
    report = root / "report"
    assert (report / "scaling.png").stat().st_size > 10_000, proc.stdout
    text = (report / "report.md").read_text()
    assert text.count("| sync") == 2 and text.count("| local-sgd") == 2, text

    # Gathering again later gives the same table.
    before = (root / "study.csv").read_text()
    again = study("--out-root", str(root), "--gather-only", timeout=60)
    assert again.returncode == 0, again.stderr
    assert (root / "study.csv").read_text() == before
