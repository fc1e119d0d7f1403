"""The one seam for collectives: a small :class:`Comm` protocol and its :class:`Work` handle.

Every engine (MPI, torch.distributed, Horovod, world size 1) implements the same few calls on
flat contiguous tensors; algorithms never see an engine. Every wait has a deadline: when it
passes, the engine names the ranks that did not arrive and raises :class:`CommError`.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import torch

from hpc_asgd.errors import CommError

OPS = ("sum", "max", "min")


@runtime_checkable
class Work(Protocol):
    """A non-blocking collective in flight."""

    def test(self) -> bool:
        """Drive progress once; True when complete (the buffer then holds the result)."""
        ...

    def wait(self, timeout: float | None = None) -> None:
        """Block until complete; after ``timeout`` s raise CommError naming missing ranks."""
        ...


@runtime_checkable
class Comm(Protocol):
    """Collectives over a group of ranks; tensors are reduced in place."""

    name: str  # engine: "mpi" | "gloo" | "nccl" | "horovod" | "local"
    rank: int
    size: int
    timeout: float  # default deadline of every wait, seconds

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None: ...

    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> Work: ...

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None: ...

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """(size, *t.shape): every rank's ``t``, in rank order."""
        ...

    def barrier(self) -> None: ...

    def split(self, color: int, key: int) -> Comm:
        """The ranks with the same ``color``, ordered by ``key`` (MPI_Comm_split)."""
        ...

    def split_node(self) -> Comm:
        """The ranks that share this node's memory (MPI_COMM_TYPE_SHARED)."""
        ...

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort); used after an uncaught error."""
        ...


class Poller:
    """Waits on a condition with a deadline, sleeping with backoff so idle ranks leave the
    cores to the ranks that compute (tests oversubscribe 2 cores with 4 ranks)."""

    SPIN = 2e-3  # s of busy polling first: MPI progresses only inside MPI calls

    def __init__(self, timeout: float | None):
        now = time.monotonic()
        self.deadline = None if timeout is None else now + timeout
        self.spin_until = now + self.SPIN
        self.nap = 0.0

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def idle(self) -> None:
        # Spin 2 ms, then sleep 20us, 40us ... capped at 1 ms: short waits stay fast (and keep
        # MPI progressing), long waits leave the cores to the ranks that compute.
        if time.monotonic() < self.spin_until:
            return
        time.sleep(self.nap)
        self.nap = min(1e-3, self.nap * 2 or 2e-5)


def timeout_error(
    comm_name: str,
    rank: int,
    what: str,
    seq: int,
    timeout: float,
    missing: list[int] | None,
    elsewhere: dict[int, int] | None = None,
) -> CommError:
    """One readable line: which collective, how long, and who did not arrive."""
    msg = f"{comm_name} {what} #{seq} timed out after {timeout:g} s on rank {rank}"
    if missing:
        msg += f": rank(s) {', '.join(map(str, missing))} did not arrive"
    elif missing is not None:
        msg += ": every peer answered; the collective itself is stuck"
    if elsewhere:
        where = ", ".join(f"rank {r} at #{s}" for r, s in sorted(elsewhere.items()))
        msg += f" (out of step: {where})"
    return CommError(msg + " (--comm-timeout)")


def check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"reduction op {op!r} not in {OPS}")
    return op
