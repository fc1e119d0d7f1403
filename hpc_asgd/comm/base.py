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

    def wait(self, timeout: float | None = None, waited: float = 0.0) -> None:
        """Block until complete; after ``timeout`` s raise CommError naming missing ranks.
        ``waited``: seconds already spent on it elsewhere (polled with ``test``); they count
        toward the deadline, so a wait past it reports the whole ``timeout``, not 0 s."""
        ...


@runtime_checkable
class Comm(Protocol):
    """Collectives over a group of ranks; tensors are reduced in place."""

    name: str  # engine: "mpi" | "gloo" | "nccl" | "horovod" | "local"
    rank: int
    size: int
    world_ranks: list[int]  # the job-wide rank of each member, in this communicator's order
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
        """The ranks on this rank's host (by host name: see :func:`split_by_host`)."""
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


HOST_BYTES = 64  # a host name's share of a gathered record (longer names are cut)


def gather_hosts(comm: Comm, host: str) -> list[str]:
    """Every rank's ``host``, in rank order: one allgather of a fixed-size byte record, which
    every engine carries (names longer than ``HOST_BYTES`` bytes are cut)."""
    record = host.encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
    table = comm.allgather(torch.frombuffer(bytearray(record), dtype=torch.uint8))
    return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in table]


def split_by_host(comm: Comm, host: str) -> Comm:
    """The ranks whose ``host`` is this rank's, ordered by rank; nodes are numbered in the
    order their first rank appears. By name rather than by shared memory
    (MPI_COMM_TYPE_SHARED): emulated nodes (network namespaces with host names of their own on
    one kernel) share memory but are separate nodes to the job. Collective."""
    first: dict[str, int] = {}
    colors = [first.setdefault(h, len(first)) for h in gather_hosts(comm, host)]
    return comm.split(colors[comm.rank], comm.rank)


def name_ranks(ranks: list[int], hosts: dict[int, str] | None = None) -> str:
    """``1 (node2), 3``: ranks, each with its host where the engine knows it."""
    hosts = hosts or {}
    return ", ".join(f"{r} ({hosts[r]})" if hosts.get(r) else str(r) for r in ranks)


def timeout_error(
    comm_name: str,
    rank: int,
    what: str,
    seq: int,
    timeout: float,
    missing: list[int] | None,
    elsewhere: dict[int, int] | None = None,
    hosts: dict[int, str] | None = None,
) -> CommError:
    """One readable line: which collective, how long, and who did not arrive (with the host
    of each, from ``hosts``, by world rank, where the engine knows it: nodes fail, not ranks)."""
    msg = f"{comm_name} {what} #{seq} timed out after {timeout:g} s on rank {rank}"
    if missing:
        msg += f": rank(s) {name_ranks(missing, hosts)} did not arrive"
    elif missing is not None:
        msg += ": every peer answered; the collective itself is stuck"
    if elsewhere:
        where = ", ".join(f"rank {r} at #{s}" for r, s in sorted(elsewhere.items()))
        msg += f" (out of step: {where})"
    return CommError(msg + " (--comm-timeout)")


def failure_error(
    comm_name: str,
    rank: int,
    what: str,
    seq: int,
    missing: list[int],
    hosts: dict[int, str] | None,
    cause: str,
) -> CommError:
    """One readable line for a collective that the engine ended with an error before any
    deadline: a peer's process died or its node went away (the connection broke)."""
    msg = f"{comm_name} {what} #{seq} failed on rank {rank}"
    if missing:
        msg += f": rank(s) {name_ranks(missing, hosts)} did not answer"
    return CommError(f"{msg} ({' '.join(cause.split())})")


def check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"reduction op {op!r} not in {OPS}")
    return op
