"""MPI engine through mpi4py: zero-copy on CPU tensors, CUDA-aware when the MPI is.

Every collective is posted non-blocking and waited on with a deadline. While a rank waits it
answers "where are you?" pings from its peers on a duplicated control communicator, so a rank
whose deadline passes can name the ranks that did not arrive: those that do not answer (dead,
stopped, or still computing) or that answer from an earlier collective.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch

from hpc_asgd.comm.base import Poller, check_op, timeout_error

_PING, _PONG = 7301, 7302


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
                dev.copy_(host, non_blocking=False)
        return self.done

    def wait(self, timeout: float | None = None) -> None:
        timeout = self.comm.timeout if timeout is None else timeout
        poll = Poller(timeout)
        while not self.test():
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
        self.timeout = timeout
        self.world_ranks = world_ranks or list(range(self.size))
        self.seq = 0  # collectives posted on this communicator
        self.cuda_aware = cuda_aware()
        self._ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}

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

    # ---- collectives ---------------------------------------------------------------------
    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> MpiWork:
        mop = self._ops[check_op(op)]
        inplace = _mpi().IN_PLACE
        return self._post("allreduce", lambda b: self.c.Iallreduce(inplace, b, op=mop), t)

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        self.iallreduce_(t, op).wait()

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None:
        self._post("broadcast", lambda b: self.c.Ibcast(b, root=root), t).wait()

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        src = t.detach().contiguous().cpu()
        out = torch.empty((self.size, *src.shape), dtype=src.dtype)
        work = self._post("allgather", lambda _: self.c.Iallgather(src.numpy(), out.numpy()))
        work.wait()
        return out.to(t.device)

    def barrier(self) -> None:
        self._post("barrier", lambda _: self.c.Ibarrier()).wait()

    def split(self, color: int, key: int) -> MpiComm:
        sub = self.c.Split(color, key)
        ranks = self._world_ranks_of(sub)
        out = MpiComm(sub, self.timeout, ranks)
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
        """Tell any peer that asks which collective this rank is waiting in."""
        mpi = _mpi()
        status = mpi.Status()
        while self.ctl.Iprobe(source=mpi.ANY_SOURCE, tag=_PING, status=status):
            src = status.Get_source()
            self.ctl.recv(source=src, tag=_PING)
            self.ctl.send(self.seq, dest=src, tag=_PONG)

    def diagnose(self, what: str, seq: int, timeout: float, grace: float = 2.0):
        """Ping every peer; those that do not answer within ``grace`` s did not arrive."""
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
    return _mpi().Get_library_version().splitlines()[0].strip()
