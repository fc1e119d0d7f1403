"""Crash-safe checkpoints, one folder per checkpoint, shared by all ranks.

Layout under ``--checkpoint-dir``::

    step-000001200-<run id>/
        rank-00000.pt     # each rank's own state (models differ between averaging rounds)
        rank-00001.pt
        manifest.json     # written LAST, by rank 0, after every rank's file is synced

A folder becomes a checkpoint only when its manifest is renamed into place, so a job killed
while writing leaves a folder the loader ignores, and resumes from the previous good one.

The run id (:func:`identity`) is a hash of the configuration without the fields that only say
where files go and when to checkpoint or stop, so that several runs can share one folder:
each keeps (``keep``), cleans up and resumes only its own checkpoints, the run id in the name
keeps two runs from ever writing into one folder, and another run's checkpoint is resumed
only when named explicitly with ``--force-resume``. Files are read with
``torch.load(weights_only=True)``; a file it refuses is a :class:`DataError`, one line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from hpc_asgd import signals
from hpc_asgd.comm import Comm
from hpc_asgd.config import Config
from hpc_asgd.env import Fault
from hpc_asgd.errors import ConfigError, DataError, WriteError
from hpc_asgd.metrics import atomic_write

MANIFEST = "manifest.json"
FORMAT = 2  # 1: no run id (such checkpoints count as another run's)
NAME = re.compile(r"step-(\d+)(?:-([0-9a-f]+))?$")

# Not part of the run id: where files go and when the run checkpoints, checks or stops
# change nothing a step computes, and a requeued job may well change them. Everything else
# stays in, ``epochs`` included: it sets the lr schedule (cosine), the evaluation steps and
# the node step at which the run is complete; a longer run is another run (--force-resume).
RUN_CONTROL = frozenset(
    {
        "resume",
        "force_resume",
        "stop_at_step",
        "checkpoint_every",
        "checkpoint_minutes",
        "check_every",
        "check_seconds",
        "checkpoint_dir",
        "out",
        "tensorboard",
        "comm_timeout",
        "data_dir",
        "download",
        "max_nonfinite",
    }
)


def identity(cfg: Config) -> tuple[str, dict]:
    """(run id, the fields it hashes): sha256 of their canonical JSON, 16 hex digits."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in RUN_CONTROL}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16], fields


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(folder: Path) -> tuple[int, str | None] | None:
    """(step, run id or None for format 1) from a checkpoint folder's name."""
    m = NAME.match(folder.name)
    return (int(m[1]), m[2]) if m else None


def complete(root: Path, run_id: str | None = None) -> list[Path]:
    """Committed checkpoints (with a manifest) of run ``run_id`` (None: of any run), oldest
    first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("step-*"):
        parsed = _parse(p)
        if parsed and (run_id is None or parsed[1] == run_id) and (p / MANIFEST).is_file():
            found.append((parsed[0], p.name, p))
    return [p for *_, p in sorted(found)]


def save(
    root: Path,
    step: int,
    comm: Comm,
    state: dict,
    run: tuple[str, dict],
    keep: int = 2,
    before_commit=None,
) -> Path:
    """Collective: every rank writes its ``state``; rank 0 commits the manifest last, then
    deletes this run's checkpoints but the newest ``keep``. ``run``: :func:`identity`.
    ``before_commit`` is a test hook (fault injection) called once every file is written."""
    run_id, fields = run
    folder = root / f"step-{step:09d}-{run_id}"
    if comm.rank == 0:
        # Rewriting a committed folder (a resume from an older one): uncommit it first, so
        # that a crash meanwhile leaves no manifest over a mix of old and new rank files.
        (folder / MANIFEST).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    comm.barrier()  # the folder exists (on a shared file system) before anyone writes
    folder.mkdir(parents=True, exist_ok=True)
    write_file = functools.partial(_write, root, run_id, step)
    write_file(folder / f"rank-{comm.rank:05d}.pt", lambda f: torch.save(state, f))
    comm.barrier()  # every rank's file is synced
    if before_commit is not None:
        before_commit()
    if comm.rank == 0:
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": comm.size,
            "run_id": run_id,
            "config": fields,
        }
        write_file(folder / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
        _fsync_dir(folder)
        for old in complete(root, run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()  # nobody races ahead and could be killed before the commit
    return folder


def _write(root: Path, run_id: str, step: int, path: Path, write) -> None:
    """``atomic_write``, or a WriteError that says which committed checkpoint is kept (this
    rank ends the job; with no manifest written, the last commit stands)."""
    try:
        atomic_write(path, write)
    except WriteError as e:
        done = complete(root, run_id)
        kept = (
            f"the last committed checkpoint, {done[-1]}, is kept" if done else "none committed yet"
        )
        raise WriteError(f"checkpoint at node step {step}: {e}; {kept}") from e


def clean(root: Path, run_id: str) -> list[Path]:
    """Delete this run's uncommitted folders and temp files (a job killed while writing).

    Only this run's: another run's uncommitted folder may be a live job writing it now, and
    no other job writes this run's (two jobs of one configuration in one folder would
    overwrite each other's checkpoints anyway). Called by rank 0 before the first save."""
    gone = []
    for p in root.glob(f"step-*-{run_id}") if root.is_dir() else []:
        if not (p / MANIFEST).is_file():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
            continue
        for tmp in p.glob(".*"):  # atomic_write's temp files: ".rank-00000.pt.XXXX"
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
            raise ValueError("no node step in it")
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / MANIFEST}: unreadable checkpoint manifest ({e})") from e
    return manifest


def load(folder: Path, rank: int, world: int) -> dict:
    """This rank's state from committed checkpoint ``folder``; DataError if unreadable."""
    manifest = read_manifest(folder)
    if manifest.get("world_size") != world:
        raise ConfigError(
            f"resume: {folder} was written by {manifest.get('world_size')} rank(s), "
            f"this job has {world}"
        )
    path = folder / f"rank-{rank:05d}.pt"
    try:
        with warnings.catch_warnings():  # the loader's notes on odd files: one error instead
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:
        raise DataError(f"{path}: unreadable checkpoint ({e})") from e
    except Exception as e:  # arbitrary bytes raise anything (once: KeyError: 174812789)
        # Not torch's message: it advises weights_only=False, i.e. running the file's code.
        raise DataError(
            f"{path}: not a valid checkpoint (corrupt, or holds objects a checkpoint never "
            f"does; refused by the safe loader: {type(e).__name__})"
        ) from None
    if not (isinstance(state, dict) and state.get("step") == manifest["step"]):
        raise DataError(
            f"{path}: not a valid checkpoint (no state of node step {manifest['step']})"
        )
    return state


def check_interval(check_every: int, check_seconds: float, step_s: float) -> int:
    """Node steps to the next USR1 check: ``check_every``, fewer when steps are slow, so that
    checks come about every ``check_seconds`` (``step_s``: seconds per node step, the
    slowest rank's)."""
    if step_s <= 0:
        return check_every
    return max(1, min(check_every, math.floor(check_seconds / step_s)))


class Checkpointer:
    """When to checkpoint, and whether to stop for a requeue; saving and resuming.

    Deterministic triggers (every N node steps, ``--stop-at-step``) need no communication.
    A USR1 (SLURM's warning before preemption) or the minutes timer reach one rank at a
    time, so with ``--checkpoint-dir`` the ranks meet at agreed node steps in a tiny
    MAX-allreduce of ``[USR1 seen, rank 0's timer expired, seconds per node step]`` and act
    together. A clock read on each rank would not do: the ranks would disagree on which
    step holds the collective. So the checks stay at node steps, and each check sets the
    next one :func:`check_interval` steps later, from the allreduced (thus identical) step
    time: about every ``--check-seconds`` (at most ``--check-every`` steps apart), so the
    checkpoint lands within SLURM's warning whatever the step time. The first check comes
    one step after the start; the seconds measured include evaluations and saves, as the
    wall clock that SLURM counts does.
    """

    def __init__(self, cfg: Config, comm: Comm):
        r = cfg.run
        self.comm, self.cfg = comm, cfg
        self.root = Path(r.checkpoint_dir) if r.checkpoint_dir else None
        self.every, self.stop_at = r.checkpoint_every, r.stop_at_step
        self.check_every, self.check_seconds = r.check_every, r.check_seconds
        self.minutes = r.checkpoint_minutes
        self.run = identity(cfg)
        self.t_last = time.monotonic()  # the last save (the minutes timer)
        self.checked = (0, self.t_last)  # (node step, time) of the last check
        self.next_check = 1
        self.saved = 0

    def next_event(self, step: int) -> int | None:
        """The next node step after ``step`` at which :meth:`at` must be called."""
        if self.root is None:
            return None
        due = [max(self.next_check, step + 1)]
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
        if step >= self.next_check:
            now = time.monotonic()
            step_s = (now - self.checked[1]) / max(1, step - self.checked[0])
            timer = self.minutes > 0 and now - self.t_last > 60 * self.minutes
            flags = torch.tensor(
                [float(signals.usr1_seen()), float(timer and self.comm.rank == 0), step_s],
                dtype=torch.float64,
            )
            self.comm.allreduce_(flags, op="max")
            stop = stop or bool(flags[0])
            save = save or bool(flags[1])
            self.checked = (step, now)
            interval = check_interval(self.check_every, self.check_seconds, float(flags[2]))
            self.next_check = step + interval
        return save or stop, stop

    def save(self, step: int, state: dict, fault: Fault | None = None) -> Path:
        def killed_while_writing() -> None:  # fault injection: die before the commit
            if (
                fault
                and fault.kind == "ckptkill"
                and (fault.rank, fault.step) == (self.comm.rank, step)
            ):
                os.kill(os.getpid(), signal.SIGKILL)

        assert self.root is not None  # callers save only with checkpointing on (at() says so)
        folder = save(
            self.root, step, self.comm, state, self.run, before_commit=killed_while_writing
        )
        self.t_last = time.monotonic()
        self.saved += 1
        return folder

    def resume(self, total: int | None = None) -> dict | None:
        """Collective: clean up, then the state to go on from (None: start fresh), the same
        checkpoint on every rank. ``--resume auto`` takes this run's newest checkpoint that
        every rank can read, falling back (with a warning) past unreadable ones; an explicit
        folder must be this run's unless ``--force-resume``. ``total``: the run's node steps
        (a checkpoint past them is refused)."""
        r = self.cfg.run
        if self.root is not None and self.comm.rank == 0:
            clean(self.root, self.run[0])
        state = None
        if r.resume == "auto":
            state = self._newest() if self.root is not None else None
        elif r.resume:
            state = self._explicit(Path(r.resume))
        if state is not None and total is not None and state["step"] > total:
            raise ConfigError(
                f"resume: the checkpoint is at node step {state['step']}, past this run's "
                f"last ({total})"
            )
        start = state["step"] if state is not None else 0
        self.checked, self.next_check = (start, time.monotonic()), start + 1
        return state

    def _explicit(self, folder: Path) -> dict:
        if not (folder / MANIFEST).is_file():
            raise ConfigError(f"resume: {folder} is not a committed checkpoint (no {MANIFEST})")
        theirs = read_manifest(folder)
        mine, fields = self.run
        if theirs.get("run_id") != mine and not self.cfg.run.force_resume:
            other = theirs.get("config")
            if isinstance(other, dict):
                diff = sorted(
                    k for k in fields.keys() | other.keys() if fields.get(k) != other.get(k)
                )
                why = f"run {theirs.get('run_id')}, differs in {', '.join(diff) or '?'}"
            else:
                why = "written before checkpoints named their run"
            raise ConfigError(
                f"resume: {folder} is another configuration's checkpoint ({why}; this run is "
                f"{mine}); --force-resume resumes it anyway"
            )
        state, err = self._try(folder)
        if state is None:
            raise DataError(err or f"{folder}: not resumed: another rank's file is unreadable")
        return state

    def _newest(self) -> dict | None:
        """This run's newest checkpoint every rank reads; older ones past unreadable ones."""
        assert self.root is not None  # resume() looks only with checkpointing on
        mine = self.run[0]
        bound = math.inf
        err = None
        while True:
            # Agree on the step (each rank lists the folder itself: listings may lag on a
            # shared file system): MAX of minus the newest below ``bound`` = the MIN of them.
            parsed = map(_parse, complete(self.root, mine))  # complete() lists parsed names only
            steps = [s for s in parsed if s is not None and s[0] < bound]
            cand = torch.tensor([-(steps[-1][0] if steps else -1.0)], dtype=torch.float64)
            self.comm.allreduce_(cand, op="max")
            step = -int(cand[0])
            if step < 0:
                break
            folder = self.root / f"step-{step:09d}-{mine}"
            state, err = self._try(folder, fallback=True)
            if state is not None:
                return state
            bound = step
        if err is not None:  # every committed checkpoint of this run failed
            raise DataError(f"{err}; no older checkpoint of this run to fall back to")
        if bound < math.inf:
            raise DataError(f"{self.root}: no checkpoint of this run is readable on every rank")
        others = len(complete(self.root)) - len(complete(self.root, mine))
        if others and self.comm.rank == 0:
            print(
                f"hpc-asgd: note: {self.root} holds {others} checkpoint(s) of other "
                f"configurations; not this run's (--resume FOLDER --force-resume takes one)",
                file=sys.stderr,
                flush=True,
            )
        return None

    def _try(self, folder: Path, fallback: bool = False) -> tuple[dict | None, str | None]:
        """(this rank's state, None) if every rank loaded its file, else (None, this rank's
        error or None): a MAX-allreduce of the failure flags, so the ranks go on together."""
        try:
            state, err = load(folder, self.comm.rank, self.comm.size), None
        except DataError as e:
            state, err = None, str(e)
        failed = torch.tensor([float(state is None)], dtype=torch.float64)
        self.comm.allreduce_(failed, op="max")
        if not bool(failed[0]):
            assert state is not None  # no rank failed, this one included
            if self.comm.rank == 0:  # the log of a requeued job says where it went on from
                print(f"hpc-asgd: resuming from node step {state['step']} ({folder})", flush=True)
            return state, None
        if fallback and err is not None:
            print(
                f"hpc-asgd: warning: rank {self.comm.rank}: {err}; "
                "falling back to the previous checkpoint",
                file=sys.stderr,
                flush=True,
            )
        return None, err
