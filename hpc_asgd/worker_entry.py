"""A worker's first code: tie its life to its parent, then become a worker.

The parent is the rank's fork server (``workers.spawn_context``), itself tied to the rank's main
process (``hpc_asgd.forkserver_guard``), or the main process itself under a spawn context.
Kept free of torch (and of every hpc_asgd module that imports it) on purpose: multiprocessing
unpickles a child's target and arguments before running it, and a worker's arguments hold
tensors, whose unpickling imports torch (seconds, in a spawned child). A parent killed then
would leave the worker running under PID 1. So the worker's spec travels as bytes
(:class:`Sealed`), the death signal is armed first, and only then is the spec unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal

PR_SET_PDEATHSIG = 1


def arm_death_signal(parent_pid: int) -> bool:
    """SIGKILL this process when its parent dies; False if the parent is already gone.

    The parent-pid check comes after arming: a parent that died before the prctl call would
    never send the signal, but this process then has another parent (PID 1 or a subreaper)."""
    with contextlib.suppress(OSError):  # not Linux: the parent's cleanup still kills workers
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent_pid


class Sealed:
    """Wraps an object so that a spawned child receives it as pickled bytes, to open later.

    Pickled by multiprocessing while it spawns the child (``Process.start``), so the shared
    tensors, queues and locks inside are reduced as for any spawn argument (their file
    descriptors are passed to that child); the child gets plain bytes."""

    def __init__(self, obj: object):
        self.obj = obj

    def __reduce__(self):
        from multiprocessing.reduction import ForkingPickler

        return bytes, (bytes(ForkingPickler.dumps(self.obj)),)


def main(index: int, parent_pid: int, sealed: bytes) -> None:
    """Target of worker ``index``, whose parent has ``parent_pid``: exit at once if orphaned,
    else run ``worker_main``."""
    if not arm_death_signal(parent_pid):
        os._exit(1)
    spec = pickle.loads(sealed)  # imports torch, rebuilds the shared tensors

    from hpc_asgd.workers import worker_main

    worker_main(index, spec)
