"""One live run per ``--out`` (and per configuration in a ``--checkpoint-dir``): a second run
is refused at start with one line naming the holder; a holder that died is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, mpi_env, summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(150)]

BASE = ["--dataset", "digits", "--model", "mlp"]


def _start_long(out: Path, *flags: str) -> subprocess.Popen:
    """A run that holds ``out`` for a while (until killed or finished)."""
    cmd = [sys.executable, "-m", "hpc_asgd.cli", "train", *BASE, "--epochs", "400"]
    proc = subprocess.Popen(
        [*cmd, *flags, "--out", str(out)],
        cwd=ROOT,
        env=mpi_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (out / ".hpc-asgd.lock").is_file() or not (out / ".hpc-asgd.lock").stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_second_run_on_a_held_out_is_refused(tmp_path: Path, ranks: int) -> None:
    out = tmp_path / "out"
    first = _start_long(out)
    try:
        res = train(ranks, *BASE, "--epochs", "1", "--out", str(out), timeout=90)
        [line] = res.error_lines()
        assert res.rc == 2, res.text
        assert f"out: {out} is in use by another run (pid {first.pid} on " in line, line
        assert "Traceback" not in res.text
        assert first.poll() is None  # the holder goes on, its folder untouched
        assert not (out / "failure.json").exists() and not (out / "summary.json").exists()
    finally:
        _stop(first)


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _start_long(out)
    os.killpg(first.pid, signal.SIGKILL)  # no release: the file stays, the kernel's lock goes
    first.communicate(timeout=30)
    assert json.loads((out / ".hpc-asgd.lock").read_text())["pid"] == first.pid
    res = train(1, *BASE, "--epochs", "1", "--out", str(out), timeout=90)
    assert res.rc == 0, res.text
    assert f"taking over {out / '.hpc-asgd.lock'} from a run that is gone (pid {first.pid}" in (
        res.text
    )
    assert summary(out)["config"]["epochs"] == 1.0
    assert not (out / ".hpc-asgd.lock").exists()  # released at the end


def test_one_live_run_per_configuration_in_a_checkpoint_folder(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    flags = ["--checkpoint-dir", str(ck), "--checkpoint-every", "1000"]
    first = _start_long(tmp_path / "a", *flags)
    try:
        same = [*BASE, "--epochs", "400", *flags]
        res = train(1, *same, "--out", str(tmp_path / "b"), timeout=90)
        [line] = res.error_lines()
        assert res.rc == 2 and f"checkpoint_dir: {ck} is in use by another run" in line, line
        # another configuration (its own checkpoints in the folder) is welcome alongside
        other = train(
            1, *BASE, "--epochs", "1", *flags, "--seed", "7", "--out", str(tmp_path / "c")
        )
        assert other.rc == 0, other.text
    finally:
        _stop(first)
