"""``hpc-asgd report``: the report and plots of real runs; its errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpc_asgd.cli", *args]
    if code is not None:  # run the CLI after ``code`` (in the same interpreter)
        run = f"{code}; import sys; from hpc_asgd.cli import main; sys.exit(main({list(args)}))"
        cmd = [sys.executable, "-c", run]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.timeout(240)
def test_report_of_two_real_runs(tmp_path: Path) -> None:
    """One process (W = 1) and two Leashed-SGD workers on the same digits: every plot is
    drawn, and the table's speed-up is the ratio of the two runs' samples/s."""
    common = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "16"]
    one, two = tmp_path / "w1", tmp_path / "w2"
    for out, extra in ((one, ["--update", "leashed"]), (two, ["--workers", "2", "--update",
                                                              "leashed"])):  # fmt: skip
        res = cli("train", *common, *extra, "--out", str(out))
        assert res.returncode == 0, res.stderr
    res = cli("report", str(one), str(two), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    rep = tmp_path / "rep"
    for name in ("curves.png", "ranks.png", "workers.png", "scaling.png"):
        data = (rep / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    text = (rep / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| none")]
    assert len(rows) == 2, text
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    speedup = s2["samples_per_s"] / s1["samples_per_s"]
    assert rows[0].startswith("| none, 1 rank | 1 | 1 | 2 |"), rows
    assert rows[1].startswith("| none leashed W=2, 1 rank | 1 | 2 | 2 |"), rows
    assert f"| {speedup:.2f} | {speedup / 2:.2f} |" in rows[1], (rows, speedup)
    for title in ("curves.png", "ranks.png", "workers.png", "scaling.png"):
        assert f"]({title})" in text
    # one folder: the report goes beside it by default
    res = cli("report", str(two))
    assert res.returncode == 0 and (two / "report" / "report.md").is_file(), res.stderr


def test_report_errors_name_the_cause(tmp_path: Path) -> None:
    res = cli("report", str(tmp_path / "absent"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"hpc-asgd report: error: {tmp_path / 'absent'}: no such folder (a run's --out folder,"
        " or a folder of them, expected)"
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"algo": "sync",\n "samples_per_s": }')
    res = cli("report", str(run), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2 and f"{run / 'summary.json'}: not valid JSON (line 2" in res.stderr
    assert not (tmp_path / "rep" / "report.md").exists()
    (run / "summary.json").write_text(json.dumps({"algo": "sync", "samples_per_s": 1.0}))
    row = {"epoch": 1, "time_s": 1.0, "samples": 16, "train_loss": 0.5, "test_acc": 0.9}
    (run / "metrics.jsonl").write_text(json.dumps(row) + '\n{"epoch": \n')
    res = cli("report", str(run))
    assert res.returncode == 2 and "metrics.jsonl: line 2 is not valid JSON" in res.stderr
    (run / "metrics.jsonl").unlink()
    # without matplotlib: one line saying how to install it, nothing written
    res = cli("report", str(run), code="import sys; sys.modules['matplotlib'] = None")
    assert res.returncode == 2 and "pip install 'hpc_asgd[plot]'" in res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert not (run / "report").exists()
