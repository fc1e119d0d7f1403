"""``failure.json``: the first failure of a run, for whoever reads the folder after a batch job.

Written by whichever process sees a failure first (a rank that raises, a rank whose deadline
passed, a rank whose worker died), into ``--out`` and beside the checkpoints. First wins,
atomically: the record is written to a temp file and hard-linked into place, which fails if a
record is already there, so a reader never sees a half-written or an overwritten one.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hpc_asgd.env import Launch

NAME = "failure.json"
# Set once by the CLI (``arm``): where to write, and who this process is. A communicator's
# watchdog, which ends a blocked rank from its own thread, reports through it too.
_armed: dict = {}


def arm(launch: Launch, folders: list[Path], step: Callable[[], int | None]) -> None:
    """From now on :func:`report` records failures of this process into ``folders``;
    ``step()`` gives the last node step."""
    _armed.update(launch=launch, folders=folders, step=step)


def report(err: BaseException, line: str) -> None:
    """Record ``err`` (its one-line message is ``line``) if no process did first; a no-op
    unless armed (library use)."""
    if _armed:
        rec = record(_armed["launch"], err, line, _armed["step"]())
        write_first(_armed["folders"], rec)


def record(launch: Launch, err: BaseException, line: str, step: int | None) -> dict:
    """What happened, where and when: the fields of ``failure.json``."""
    rec = {
        "rank": launch.rank,
        "world_size": launch.size,
        "host": launch.hostname,
        "pid": os.getpid(),
        "worker": None,
        "exit_code": 1,  # what this rank exits with
        "signal": None,
        "error": line,
        "error_type": type(err).__name__,
        "last_node_step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job_id": launch.slurm_job_id,
    }
    worker = getattr(err, "worker", None)
    if worker is not None:  # a worker died, raised or stalled (WorkerError): its own facts
        code = getattr(err, "exitcode", None)
        # exit_code None: it was still running
        rec.update(worker=worker, pid=getattr(err, "pid", None), exit_code=code)
        if code is not None and code < 0:
            rec.update(exit_code=None, signal=signal.Signals(-code).name)
    return rec


def write_first(folders: list[Path], rec: dict) -> list[Path]:
    """Write ``rec`` as ``failure.json`` into each existing folder that has none yet; returns
    the files this process wrote. Never raises: the error line was printed already."""
    wrote = []
    text = (json.dumps(rec, indent=2) + "\n").encode()
    for folder in folders:
        try:
            if not folder.is_dir():
                continue
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{NAME}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, folder / NAME)  # fails if another process recorded first
                wrote.append(folder / NAME)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        except OSError:
            continue
    return wrote


def clear(folders: list[Path]) -> None:
    """Remove an earlier run's record (rank 0, before the engine starts)."""
    for folder in folders:
        (folder / NAME).unlink(missing_ok=True)
