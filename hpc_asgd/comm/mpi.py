"""MPI engine through mpi4py: zero-copy on CPU tensors, CUDA-aware when the MPI is.

Deadlines without giving up MPI's fast blocking algorithms: a watchdog thread per process
(MPI_THREAD_MULTIPLE) answers "which collective are you in?" pings from peers on a duplicated
control communicator, and watches the blocking collective the main thread is in. When a
deadline passes, the waiting rank pings every peer: those that do not answer (dead, stopped)
or that answer from an earlier collective (still computing, or stuck elsewhere) are named, the
one-line error is printed and the job is aborted. Non-blocking work (``iallreduce_``) is waited
on by polling, so ``Work.wait(timeout)`` raises :class:`CommError` instead.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import weakref

import torch

from hpc_asgd.comm.base import Poller, check_op, timeout_error
from hpc_asgd.errors import error_line

_PING, _PONG = 7301, 7302
# s between the watchdog's looks (ping answers, deadlines): rare enough not to contend with the
# main thread for MPI's progress engine, frequent enough to answer a 2 s diagnosis.
_WATCH_EVERY = 0.05


def _mpi():
    from mpi4py import MPI  # lazy: importing initialises MPI, which only rank main processes do

    return MPI


def cuda_aware() -> bool:
    """True when the MPI library says it can read CUDA device memory (MPIX_Query_cuda_support)."""
    _mpi()
    try:
        fn = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (AttributeError, OSError):
        return False
    fn.restype = ctypes.c_int
    return bool(fn())


class _Watchdog(threading.Thread):
    """One per process: answers pings of every live communicator and enforces the deadline of
    the blocking collective the main thread is in."""

    def __init__(self) -> None:
        super().__init__(name="hpc_asgd-mpi-watchdog", daemon=True)
        self.comms: weakref.WeakSet[MpiComm] = weakref.WeakSet()
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            time.sleep(_WATCH_EVERY)
            with self.lock:
                comms = list(self.comms)
            for comm in comms:
                comm.answer_pings()
                blocked = comm.blocked
                if blocked is not None and time.monotonic() > blocked[2]:
                    what, seq, _, timeout = blocked
                    err = comm.diagnose(what, seq, timeout)
                    print(error_line(comm.world_ranks[comm.rank], comm.world_size, err),
                          file=sys.stderr, flush=True)  # fmt: skip
                    comm.abort(1)


_watchdogs: list[_Watchdog] = []  # at most one, started on first use


def _watch(comm: MpiComm) -> bool:
    """Register ``comm`` with the watchdog; False without MPI_THREAD_MULTIPLE, where waits
    poll and answer pings themselves."""
    mpi = _mpi()
    if mpi.Query_thread() < mpi.THREAD_MULTIPLE:
        return False
    if not _watchdogs:
        _watchdogs.append(_Watchdog())
        _watchdogs[0].start()
    with _watchdogs[0].lock:
        _watchdogs[0].comms.add(comm)
    return True


class MpiWork:
    """An MPI request; copies a host-staged result back to the device on completion."""

    def __init__(self, comm: MpiComm, req, seq: int, what: str, staged=None):
        self.comm, self.req, self.seq, self.what = comm, req, seq, what
        self.staged = staged  # (host tensor, device tensor) when the MPI is not CUDA-aware
        self.done = False

    def test(self) -> bool:
        if not self.done and self.req.Test():
            self.done = True
            if self.staged is not None:
                host, dev = self.staged
                dev.copy_(host)
        return self.done

    def wait(self, timeout: float | None = None) -> None:
        timeout = self.comm.timeout if timeout is None else timeout
        poll = Poller(timeout)
        while not self.test():  # every Test() also drives MPI's progress
            if not self.comm.watched:
                self.comm.answer_pings()
            if poll.expired():
                raise self.comm.diagnose(self.what, self.seq, timeout)
            poll.idle()


class MpiComm:
    """A communicator; ``MpiComm()`` wraps (a duplicate of) COMM_WORLD."""

    name = "mpi"

    def __init__(self, comm=None, timeout: float = 300.0, world_ranks: list[int] | None = None):
        mpi = _mpi()
        base = mpi.COMM_WORLD if comm is None else comm
        # Separate contexts: our collectives never match a user's, pings never match data.
        self.c = base.Dup()
        self.ctl = base.Dup()
        self.rank, self.size = self.c.Get_rank(), self.c.Get_size()
        self.world_size = mpi.COMM_WORLD.Get_size()
        self.timeout = timeout
        self.world_ranks = world_ranks or list(range(self.size))
        self.seq = 0  # collectives entered on this communicator
        self.blocked: tuple[str, int, float, float] | None = None  # (what, seq, deadline, timeout)
        self.cuda_aware = cuda_aware()
        self._ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
        self.watched = _watch(self)

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

    def _blocking(self, what: str, call, blocking, t: torch.Tensor | None = None) -> None:
        """Run MPI's blocking collective under the watchdog's deadline, or, without a
        watchdog, its non-blocking twin ``call`` under a polled one."""
        if not self.watched:
            self._post(what, call, t).wait()
            return
        self.seq += 1
        buf, staged = self._buf(t) if t is not None else (None, None)
        self.blocked = (what, self.seq, time.monotonic() + self.timeout, self.timeout)
        try:
            blocking(buf)
        finally:
            self.blocked = None
        if staged is not None:
            staged[1].copy_(staged[0])

    # ---- collectives ---------------------------------------------------------------------
    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> MpiWork:
        mop = self._ops[check_op(op)]
        inplace = _mpi().IN_PLACE
        return self._post("allreduce", lambda b: self.c.Iallreduce(inplace, b, op=mop), t)

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        mop = self._ops[check_op(op)]
        inplace = _mpi().IN_PLACE
        self._blocking(
            "allreduce",
            lambda b: self.c.Iallreduce(inplace, b, op=mop),
            lambda b: self.c.Allreduce(inplace, b, op=mop),
            t,
        )

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None:
        self._blocking(
            "broadcast",
            lambda b: self.c.Ibcast(b, root=root),
            lambda b: self.c.Bcast(b, root=root),
            t,
        )

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        src = t.detach().contiguous().cpu()
        out = torch.empty((self.size, *src.shape), dtype=src.dtype)
        self._blocking(
            "allgather",
            lambda _: self.c.Iallgather(src.numpy(), out.numpy()),
            lambda _: self.c.Allgather(src.numpy(), out.numpy()),
        )
        return out.to(t.device)

    def barrier(self) -> None:
        self._blocking("barrier", lambda _: self.c.Ibarrier(), lambda _: self.c.Barrier())

    def split(self, color: int, key: int) -> MpiComm:
        sub = self.c.Split(color, key)
        out = MpiComm(sub, self.timeout, self._world_ranks_of(sub))
        sub.Free()
        return out

    def split_node(self) -> MpiComm:
        sub = self.c.Split_type(_mpi().COMM_TYPE_SHARED, key=self.rank)
        out = MpiComm(sub, self.timeout, self._world_ranks_of(sub))
        sub.Free()
        return out

    def _world_ranks_of(self, sub) -> list[int]:
        local = sub.Get_group().Translate_ranks(list(range(sub.Get_size())), self.c.Get_group())
        return [self.world_ranks[r] for r in local]

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        _mpi().COMM_WORLD.Abort(code)

    # ---- deadlines -----------------------------------------------------------------------
    def answer_pings(self) -> None:
        """Tell any peer that asks how many collectives this rank has entered here."""
        mpi = _mpi()
        status = mpi.Status()
        while self.ctl.Iprobe(source=mpi.ANY_SOURCE, tag=_PING, status=status):
            src = status.Get_source()
            self.ctl.recv(source=src, tag=_PING)
            self.ctl.send(self.seq, dest=src, tag=_PONG)

    def diagnose(self, what: str, seq: int, timeout: float, grace: float = 2.0):
        """Ping every peer; those that do not answer within ``grace`` s, or answer with an
        earlier collective, did not arrive."""
        peers = [r for r in range(self.size) if r != self.rank]
        sends = [self.ctl.isend(seq, dest=r, tag=_PING) for r in peers]
        recvs = {r: self.ctl.irecv(source=r, tag=_PONG) for r in peers}
        answers: dict[int, int] = {}
        end = time.monotonic() + grace
        while recvs and time.monotonic() < end:
            for r, req in list(recvs.items()):
                ok, value = req.test()
                if ok:
                    answers[r] = value
                    del recvs[r]
            if not self.watched:
                self.answer_pings()
            time.sleep(1e-3)
        del sends  # the job is about to be aborted; unmatched requests do not matter
        missing = [self.world_ranks[r] for r in peers if r not in answers or answers[r] < seq]
        behind = {self.world_ranks[r]: s for r, s in answers.items() if s < seq}
        return timeout_error(
            self.name, self.world_ranks[self.rank], what, seq, timeout, missing, behind
        )


def library_version() -> str:
    """The MPI library's own version line (for ``hpc-asgd info`` and benchmarks)."""
    return _mpi().Get_library_version().splitlines()[0].strip().strip("\x00")
