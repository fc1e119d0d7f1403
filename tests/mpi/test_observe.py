"""What a run shows while it trains: TensorBoard scalars (``--tensorboard``, read back with
TensorBoard's own reader and checked against metrics.jsonl) and the live line on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, mpi_env, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(180)]

BASE = ["--dataset", "digits", "--model", "mlp", "--epochs", "3"]


@pytest.mark.parametrize(
    ("ranks", "flags"),
    [
        (1, ["--algo", "none"]),
        (2, ["--algo", "lasgd", "--period", "4", "--workers", "2", "--eval-every", "0.5"]),
        (2, ["--algo", "sync"]),
    ],
    ids=["none-1", "lasgd-2x2-workers", "sync-2"],
)
def test_tensorboard_scalars_are_the_metrics_rows(tmp_path: Path, ranks: int, flags) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, board = tmp_path / "out", tmp_path / "tb"
    res = train(ranks, *BASE, *flags, "--out", str(out), "--tensorboard", str(board))
    assert res.rc == 0, res.text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(board), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for tag, key in (
        ("test/accuracy", "test_acc"),
        ("test/loss", "test_loss"),
        ("train/loss", "train_loss"),
        ("train/epoch", "epoch"),
    ):
        got = [e.value for e in events.Scalars(tag)]
        assert got == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-7), tag
    assert len(rows) >= 3
    summary = json.loads((out / "summary.json").read_text())
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr == pytest.approx([summary["config"]["lr"]] * len(rows))  # constant schedule
    assert len(events.Scalars("train/samples_per_s")) == len(rows) - 1
    assert all(e.value > 0 for e in events.Scalars("train/samples_per_s"))
    rounds = [e.value for e in events.Scalars("comm/rounds")]
    assert rounds == sorted(rounds) and rounds[-1] <= summary["averaging_rounds"]
    for r in range(ranks):  # every rank's figures at the end, from the summary
        [wait] = events.Scalars(f"rank/comm_wait_s/{r}")
        assert wait.value == pytest.approx(summary["comm_wait_s"][r], rel=1e-6, abs=1e-9)
    texts = events.Tags()["tensors"]
    assert "config/text_summary" in texts and "summary/text_summary" in texts
    [config] = events.Tensors("config/text_summary")
    assert 'algo = "' + summary["algo"] + '"' in config.tensor_proto.string_val[0].decode()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_terminal_gets_a_live_line_and_a_log_exactly_the_epoch_lines(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "hpc_asgd.cli", "train", *BASE, "--out", str(tmp_path / "a")]
    env = mpi_env({"TERM": "xterm", "COLUMNS": "160"})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, cols
    proc = subprocess.Popen(
        cmd, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")
    shown = seen.decode(errors="replace")
    live = r"\| *(\d+)/132 steps \[[0-9:]+<[0-9:?]+, ep [0-9.]+, [0-9,]+ samples/s"
    bar = re.findall(live, shown)
    assert bar, shown
    assert "acc 0." in shown  # the last test accuracy, after the first evaluation
    assert len(re.findall(r"epoch +\d\.\d\d  time", shown)) == 3
    # no terminal: exactly the lines of a log, nothing drawn
    res = subprocess.run(
        [*cmd[:-1], str(tmp_path / "b")], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0 and res.stderr == "", res.stderr
    out = _lines(res.stdout)
    assert all(re.fullmatch(r"epoch +\d\.\d\d  time +[0-9.]+s  train_loss .*", x) for x in out[:3])
    assert all(x.startswith("  ") for x in out[3:]) and "\r" not in res.stdout, res.stdout
