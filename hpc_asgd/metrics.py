"""Outputs of a run (rank 0 only): ``metrics.jsonl``, ``summary.json``, ``model.pt``, progress.

Every file is written atomically (temp file in the same folder, fsync, rename), so a reader
never takes a half-written file for a good one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import hpc_asgd


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: strict JSON (RFC 8259) has
    no NaN or Infinity, and readers such as ``jq`` or JavaScript reject Python's bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((dumps(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(dumps(r) + "\n" for r in rows).encode()))


def save_model(path: Path, module: torch.nn.Module, config: dict) -> None:
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"state_dict": state, "config": config}, f))


def versions(comm_name: str | None = None) -> dict[str, str]:
    out = {
        "hpc_asgd": hpc_asgd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    if comm_name == "mpi":
        import mpi4py

        from hpc_asgd.comm.mpi import library_version

        out["mpi4py"] = mpi4py.__version__
        out["mpi"] = library_version()
    return out


class Progress:
    """Rank 0's progress: a bar redrawn in place on a terminal, one line per epoch otherwise."""

    def __init__(self, total_steps: int, steps_per_epoch: int, enabled: bool, tty: bool):
        self.total, self.spe = total_steps, steps_per_epoch
        self.enabled, self.tty = enabled, tty
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.warned: set[str] = set()

    def step(self, step: int, loss: float | None = None) -> None:
        now = time.perf_counter()
        if not (self.enabled and self.tty) or now - self.last_draw < 0.2:
            return
        self.last_draw = now
        frac = step / self.total
        bar = "#" * int(30 * frac)
        tail = f" loss {loss:.3f}" if loss is not None else ""
        print(
            f"\r[{bar:<30}] {step}/{self.total} ep {step / self.spe:.2f}{tail} ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def warn(self, message: str) -> None:
        """One warning line (rank 0), each distinct message once."""
        if self.enabled and message not in self.warned:
            self.warned.add(message)
            print(f"hpc-asgd: warning: {message}", file=sys.stderr, flush=True)

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.tty:
            print("\r" + " " * 79 + "\r", end="", file=sys.stderr)
        print(
            f"epoch {row['epoch']:6.2f}  time {row['time_s']:7.1f}s  "
            f"train_loss {row['train_loss']:.4f}  "
            f"test_loss {row['test_loss']:.4f}  test_acc {row['test_acc']:.4f}",
            flush=True,
        )
