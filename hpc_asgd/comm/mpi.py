"""MPI engine through mpi4py: zero-copy on CPU tensors, CUDA-aware when the MPI is.

Deadlines without giving up MPI's fast blocking algorithms: blocking collectives call MPI's
blocking functions while a watchdog thread (which never calls MPI) watches the deadline;
non-blocking work is waited on by polling ``Test`` in the calling thread. When a deadline
passes, the rank asks every peer's status service (``status.py``, plain TCP) how many
collectives it entered: those that do not answer (dead, stopped) or answer with a lower count
(still computing, or stuck elsewhere) are named. A polled wait raises :class:`CommError`; a
blocked one is ended by the watchdog, which prints the one-line error and aborts the job.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time
import weakref

import numpy as np
import torch

from hpc_asgd import failure
from hpc_asgd.comm import status
from hpc_asgd.comm.base import (
    Comm,
    Poller,
    check_op,
    failure_error,
    split_by_host,
    timeout_error,
)
from hpc_asgd.env import short_host
from hpc_asgd.errors import CommError, error_line

_WATCH_EVERY = 0.05  # s between the watchdog's looks at blocked collectives
_GRACE = 2.0  # s peers get to answer "where are you?"


_INIT_SETTLE = 0.5  # s between MPI_Init and the first message (see ``mpi_module``)
_settled: list[bool] = []


def mpi_module():
    """The MPI module; importing it initialises MPI, which only rank main processes do.

    Open MPI 5.0 can crash a rank still inside MPI_Init when a faster peer, already out of the
    closing PMIx fence, sends to it (a segfault in mca_pml_ob1_recv_frag_callback_match; seen
    here once in 26 srun jobs across emulated nodes; upstream open-mpi/ompi#11438, PR #13559).
    Every first collective of ours follows MPI_Init at once, so a fresh Open MPI process waits
    a moment before it, which lets the slower peers finish their MPI_Init."""
    from mpi4py import MPI

    if not _settled:
        _settled.append(True)
        if MPI.COMM_WORLD.Get_size() > 1 and "Open MPI v5.0" in MPI.Get_library_version():
            time.sleep(_INIT_SETTLE)
    return MPI


def cuda_aware() -> bool:
    """True when the MPI library says it can read CUDA device memory (MPIX_Query_cuda_support)."""
    mpi_module()
    try:
        fn = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (AttributeError, OSError):
        return False
    fn.restype = ctypes.c_int
    return bool(fn())


class _Process:
    """Per-process state shared by every communicator: the status service, the peers'
    addresses (by world rank), the live communicators (by id) and the watchdog thread."""

    def __init__(self) -> None:
        mpi = mpi_module()
        self.comms: weakref.WeakValueDictionary[int, MpiComm] = weakref.WeakValueDictionary()
        self.next_cid = 0
        self.server = status.StatusServer(self._count)
        self.server.start()
        world = mpi.COMM_WORLD
        mine = np.frombuffer(status.encode_address(self.server.port), dtype=np.uint8)
        table = np.empty((world.Get_size(), status.RECORD), dtype=np.uint8)
        world.Allgather(mine, table)  # collective, once, right after MPI_Init
        self.addresses = [status.decode_address(row.tobytes()) for row in table]
        self.threaded = mpi.Query_thread() >= mpi.THREAD_MULTIPLE
        threading.Thread(target=self._watch, name="hpc_asgd-watchdog", daemon=True).start()

    def _count(self, cid: int) -> int:
        comm = self.comms.get(cid)
        return -1 if comm is None else comm.seq

    def register(self, comm: MpiComm) -> int:
        cid, self.next_cid = self.next_cid, self.next_cid + 1
        self.comms[cid] = comm
        return cid

    def _watch(self) -> None:
        while True:
            time.sleep(_WATCH_EVERY)
            for comm in list(self.comms.values()):
                blocked = comm.blocked
                if blocked is not None and time.monotonic() > blocked[2]:
                    what, seq, _, timeout = blocked
                    err = comm.diagnose(what, seq, timeout)
                    rank = comm.world_ranks[comm.rank]
                    host = short_host(self.addresses[rank][0])
                    line = error_line(rank, len(self.addresses), err, host)
                    print(line, file=sys.stderr, flush=True)
                    failure.report(err, line)
                    if self.threaded:
                        mpi_module().COMM_WORLD.Abort(1)
                    os._exit(1)  # the launcher ends the other ranks on a non-zero exit


_process: list[_Process] = []  # one, made with the first communicator


def _proc() -> _Process:
    if not _process:
        _process.append(_Process())
    return _process[0]


class MpiWork:
    """An MPI request; copies a host-staged result back to the device on completion."""

    def __init__(self, comm: MpiComm, req, seq: int, what: str, staged=None):
        self.comm, self.req, self.seq, self.what = comm, req, seq, what
        self.staged = staged  # (host tensor, device tensor) when the MPI is not CUDA-aware
        self.done = False

    def test(self) -> bool:
        try:
            done = self.done or self.req.Test()
        except mpi_module().Exception as e:  # a peer failed (an MPI that reports it: ULFM, MPICH)
            raise self.comm.failure(self.what, self.seq, e) from None
        if done and not self.done:
            self.done = True
            if self.staged is not None:
                host, dev = self.staged
                dev.copy_(host)
        return self.done

    def wait(self, timeout: float | None = None, waited: float = 0.0) -> None:
        timeout = self.comm.timeout if timeout is None else timeout
        poll = Poller(max(0.0, timeout - waited))
        while not self.test():  # every Test() also drives MPI's progress
            if poll.expired():
                raise self.comm.diagnose(self.what, self.seq, timeout)
            poll.idle()


class MpiComm:
    """A communicator; ``MpiComm()`` wraps (a duplicate of) COMM_WORLD."""

    name = "mpi"

    def __init__(self, comm=None, timeout: float = 300.0, world_ranks: list[int] | None = None):
        mpi = mpi_module()
        base = mpi.COMM_WORLD if comm is None else comm
        self.c = base.Dup()  # a context of our own: our collectives never match a user's
        self.rank, self.size = self.c.Get_rank(), self.c.Get_size()
        self.timeout = timeout
        self.world_ranks = world_ranks or list(range(self.size))
        self.seq = 0  # collectives entered on this communicator
        self.blocked: tuple[str, int, float, float] | None = None  # (what, seq, deadline, timeout)
        self.cuda_aware = cuda_aware()
        self._ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
        self.proc = _proc()
        self.cid = self.proc.register(self)

    # ---- buffers -------------------------------------------------------------------------
    def _buf(self, t: torch.Tensor):
        """(buffer MPI reads/writes, staging pair or None). CPU: a zero-copy numpy view."""
        if not t.is_contiguous():
            raise ValueError("collectives need contiguous (flat) tensors")
        if t.device.type == "cpu":
            return t.detach().numpy(), None
        if self.cuda_aware:
            torch.cuda.current_stream(t.device).synchronize()
            return t.detach(), None  # mpi4py reads __cuda_array_interface__
        host = t.detach().to("cpu")
        return host.numpy(), (host, t)

    def _post(self, what: str, start, t: torch.Tensor | None = None) -> MpiWork:
        self.seq += 1
        buf, staged = self._buf(t) if t is not None else (None, None)
        return MpiWork(self, start(buf), self.seq, what, staged)

    def _blocking(self, what: str, blocking, t: torch.Tensor | None = None) -> None:
        """Run MPI's blocking collective under the watchdog's deadline."""
        self.seq += 1
        buf, staged = self._buf(t) if t is not None else (None, None)
        self.blocked = (what, self.seq, time.monotonic() + self.timeout, self.timeout)
        try:
            blocking(buf)
        except mpi_module().Exception as e:
            raise self.failure(what, self.seq, e) from None
        finally:
            self.blocked = None
        if staged is not None:
            staged[1].copy_(staged[0])

    # ---- collectives ---------------------------------------------------------------------
    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> MpiWork:
        mop = self._ops[check_op(op)]
        inplace = mpi_module().IN_PLACE
        return self._post("allreduce", lambda b: self.c.Iallreduce(inplace, b, op=mop), t)

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        mop = self._ops[check_op(op)]
        inplace = mpi_module().IN_PLACE
        self._blocking("allreduce", lambda b: self.c.Allreduce(inplace, b, op=mop), t)

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None:
        self._blocking("broadcast", lambda b: self.c.Bcast(b, root=root), t)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        src = t.detach().contiguous().cpu()
        out = torch.empty((self.size, *src.shape), dtype=src.dtype)
        self._blocking("allgather", lambda _: self.c.Allgather(src.numpy(), out.numpy()))
        return out.to(t.device)

    def barrier(self) -> None:
        self._blocking("barrier", lambda _: self.c.Barrier())

    def split(self, color: int, key: int) -> MpiComm:
        sub = self.c.Split(color, key)
        out = MpiComm(sub, self.timeout, self._world_ranks_of(sub))
        sub.Free()
        return out

    def split_node(self) -> Comm:
        return split_by_host(self, socket.gethostname())

    def _world_ranks_of(self, sub) -> list[int]:
        local = sub.Get_group().Translate_ranks(list(range(sub.Get_size())), self.c.Get_group())
        return [self.world_ranks[r] for r in local]

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        mpi_module().COMM_WORLD.Abort(code)

    # ---- deadlines -----------------------------------------------------------------------
    def diagnose(self, what: str, seq: int, timeout: float):
        """Ask every peer how far it got; those that do not answer within the grace time, or
        answer with an earlier collective, did not arrive."""
        peers = {self.world_ranks[r]: r for r in range(self.size) if r != self.rank}
        answers = status.ask_all({w: self.proc.addresses[w] for w in peers}, self.cid, _GRACE)
        missing = sorted(w for w, n in answers.items() if n is None or n < seq)
        behind = {w: n for w, n in answers.items() if n is not None and 0 <= n < seq}
        hosts = {w: short_host(self.proc.addresses[w][0]) for w in missing}
        return timeout_error(
            self.name, self.world_ranks[self.rank], what, seq, timeout, missing, behind, hosts
        )

    def failure(self, what: str, seq: int, err) -> CommError:
        """MPI reported an error (with Open MPI's ULFM, ``OMPI_MCA_mpi_ft_enable=1``, a dead
        peer gives MPI_ERR_PROC_FAILED instead of aborting this process): the peers that do
        not answer the status service are the ones that failed."""
        peers = {self.world_ranks[r]: r for r in range(self.size) if r != self.rank}
        answers = status.ask_all({w: self.proc.addresses[w] for w in peers}, self.cid, _GRACE)
        dead = sorted(w for w, n in answers.items() if n is None)
        hosts = {w: short_host(self.proc.addresses[w][0]) for w in dead}
        cause = err.Get_error_string() if hasattr(err, "Get_error_string") else str(err)
        return failure_error(self.name, self.world_ranks[self.rank], what, seq, dead, hosts, cause)


def library_version() -> str:
    """The MPI library's own version line (for ``hpc-asgd info`` and benchmarks)."""
    return mpi_module().Get_library_version().splitlines()[0].strip().strip("\x00")
