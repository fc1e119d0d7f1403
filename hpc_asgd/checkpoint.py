"""Crash-safe checkpoints, one folder per checkpoint, shared by all ranks.

Layout under ``--checkpoint-dir``::

    step-000001200/
        rank-00000.pt     # each rank's own state (models differ between averaging rounds)
        rank-00001.pt
        manifest.json     # written LAST, by rank 0, after every rank's file is synced

A folder becomes a checkpoint only when its manifest is renamed into place, so a job killed
while writing leaves a folder the loader ignores, and resumes from the previous good one. The
newest ``keep`` checkpoints are kept. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from hpc_asgd import signals
from hpc_asgd.comm import Comm
from hpc_asgd.config import Config
from hpc_asgd.env import Fault
from hpc_asgd.errors import ConfigError, DataError
from hpc_asgd.metrics import atomic_write

MANIFEST = "manifest.json"
FORMAT = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, comm: Comm, state: dict, keep: int = 2, before_commit=None) -> Path:
    """Collective: every rank writes its ``state``; rank 0 commits the manifest last.
    ``before_commit`` is a test hook (fault injection) called once every file is written."""
    folder = root / f"step-{step:09d}"
    if comm.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    comm.barrier()  # the folder exists (on a shared file system) before anyone writes
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"rank-{comm.rank:05d}.pt", lambda f: torch.save(state, f))
    comm.barrier()  # every rank's file is synced
    if before_commit is not None:
        before_commit()
    if comm.rank == 0:
        manifest = {"format": FORMAT, "step": step, "world_size": comm.size}
        atomic_write(folder / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
        _fsync_dir(folder)
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()  # nobody races ahead and could be killed before the commit
    return folder


def complete(root: Path) -> list[Path]:
    """Committed checkpoints (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(resume: str, root: Path | None) -> Path | None:
    """``auto``: the newest committed checkpoint under ``root`` (None: start fresh); else a path."""
    if resume == "auto":
        found = complete(root) if root else []
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"resume: {path} is not a committed checkpoint (no {MANIFEST})")
    return path


def load(folder: Path, rank: int, world: int) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / MANIFEST}: unreadable checkpoint manifest ({e})") from e
    if manifest.get("world_size") != world:
        raise ConfigError(
            f"resume: {folder} was written by {manifest.get('world_size')} rank(s), "
            f"this job has {world}"
        )
    path = folder / f"rank-{rank:05d}.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as e:
        raise DataError(f"{path}: unreadable checkpoint ({e})") from e


class Checkpointer:
    """When to checkpoint, and whether to stop for a requeue.

    Deterministic triggers (every N node steps, ``--stop-at-step``) need no communication.
    A USR1 (SLURM's warning before preemption) or the minutes timer reach one rank at a
    time, so with ``--checkpoint-dir`` the ranks meet every ``--check-every`` node steps in a
    tiny MAX-allreduce of ``[USR1 seen, rank 0's timer expired]`` and act together.
    """

    def __init__(self, cfg: Config, comm: Comm):
        r = cfg.run
        self.comm, self.cfg = comm, cfg
        self.root = Path(r.checkpoint_dir) if r.checkpoint_dir else None
        self.every, self.check, self.stop_at = r.checkpoint_every, r.check_every, r.stop_at_step
        self.minutes = r.checkpoint_minutes
        self.t_last = time.monotonic()
        self.saved = 0

    def next_event(self, step: int) -> int | None:
        """The next node step after ``step`` at which :meth:`at` must be called."""
        if self.root is None:
            return None
        due = [self.check * (step // self.check + 1)]
        if self.every:
            due.append(self.every * (step // self.every + 1))
        if self.stop_at > step:
            due.append(self.stop_at)
        return min(due)

    def at(self, step: int) -> tuple[bool, bool]:
        """(save a checkpoint now, then stop); collective at check steps, same on every rank."""
        if self.root is None:
            return False, False
        save = bool(self.every) and step % self.every == 0
        stop = step == self.stop_at
        if step % self.check == 0:
            timer = self.minutes > 0 and time.monotonic() - self.t_last > 60 * self.minutes
            flags = torch.tensor([float(signals.usr1_seen()), float(timer and self.comm.rank == 0)])
            self.comm.allreduce_(flags, op="max")
            stop = stop or bool(flags[0])
            save = save or bool(flags[1])
        return save or stop, stop

    def save(self, step: int, state: dict, fault: Fault | None = None) -> Path:
        def killed_while_writing() -> None:  # fault injection: die before the commit
            if (
                fault
                and fault.kind == "ckptkill"
                and (fault.rank, fault.step) == (self.comm.rank, step)
            ):
                os.kill(os.getpid(), signal.SIGKILL)

        folder = save(self.root, step, self.comm, state, before_commit=killed_while_writing)
        self.t_last = time.monotonic()
        self.saved += 1
        return folder

    def resume(self) -> dict | None:
        r = self.cfg.run
        if not r.resume:
            return None
        folder = resolve(r.resume, self.root)
        if folder is None:
            return None
        state = load(folder, self.comm.rank, self.comm.size)
        if self.comm.rank == 0:  # the log of a requeued job says where it went on from
            print(f"hpc-asgd: resuming from node step {state['step']} ({folder})", flush=True)
        return state
