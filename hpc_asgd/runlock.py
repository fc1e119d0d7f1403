"""One live run per output folder: ``--out`` (and this configuration's checkpoints in
``--checkpoint-dir``) are held by the run writing them, so that two runs never mix their files.

Rank 0 holds a lock file in the folder: an exclusive ``flock`` (on NFS, Linux emulates it with
POSIX record locks that every client sees) that the kernel releases when the process dies, so a
lock is never left held by a dead run; the file itself names its holder (pid, host, start time,
job id) for the refusal's message. A file left by a run that died, unlocked, is taken over with
a warning. A file system without locks (Lustre without ``-o flock``) is run on with a warning:
two runs on one folder are not detected there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from hpc_asgd.errors import ConfigError

NAME = ".hpc-asgd.lock"
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


class Held:
    """A folder this process holds; :meth:`release` (idempotent) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            # ours still (not taken over after a stale unlock): remove it, then unlock
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = -1


def _holder(text: str) -> str:
    try:
        rec = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec["since"])))
        job = f", job {rec['job']}" if rec.get("job") else ""
        return f"pid {int(rec['pid'])} on {rec['host']}{job}, since {since}"
    except (ValueError, KeyError, TypeError, OverflowError):
        return "a run that left no readable record"


def hold(folder: Path, what: str, job: str | None, name: str = NAME) -> Held | None:
    """Hold ``folder`` (which exists) for this run, or raise ConfigError naming the live run
    that holds it. ``what`` names the flag in messages. None where locks are not supported."""
    path = folder / name
    for _ in range(10):  # a holder that ends removes the file: lock the one at ``path`` now
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            return _lock(fd, folder, path, what, job)
        except _Replaced:
            continue
        except OSError as e:
            raise ConfigError(f"{what}: cannot hold {path}: {e.strerror or e}") from None
    raise ConfigError(f"{what}: {path} keeps changing under this run: another run is starting")


class _Replaced(Exception):
    """The lock file was removed or replaced between its opening and its locking."""


def _lock(fd: int, folder: Path, path: Path, what: str, job: str | None) -> Held | None:
    """Held, or None where the file system has no locks; ``fd`` is closed unless Held."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            raise ConfigError(
                f"{what}: {folder} is in use by another run ({_holder(text)}); give each run "
                f"its own --{what.replace('_', '-')}"
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            print(
                f"hpc-asgd: warning: {what}: {folder} cannot be locked ({e.strerror}): a "
                "second run on it would not be detected",
                file=sys.stderr,
                flush=True,
            )
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise _Replaced
        except FileNotFoundError:
            raise _Replaced from None
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if left.strip():  # a run that died (or exited without releasing): its lock is free
            print(
                f"hpc-asgd: warning: {what}: taking over {path} from a run that is gone "
                f"({_holder(left)})",
                file=sys.stderr,
                flush=True,
            )
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "job": job}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return Held(path, fd)
