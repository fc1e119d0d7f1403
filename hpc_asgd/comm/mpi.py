"""MPI engine through mpi4py: zero-copy on CPU tensors, CUDA-aware when the MPI is.

Deadlines without giving up MPI's fast blocking algorithms: blocking collectives call MPI's
blocking functions while a watchdog thread (which never calls MPI) watches the deadline;
non-blocking work is waited on by polling ``Test`` in the calling thread. When a deadline
passes, the rank asks every peer's status service (``status.py``, plain TCP) how many
collectives it entered: those that do not answer (dead, stopped) or answer with a lower count
(still computing, or stuck elsewhere) are named. A polled wait raises :class:`CommError`; a
blocked one is ended by the watchdog, which prints the one-line error and aborts the job.

Start-up has deadlines too: the first exchange (every rank's status address and share of the
job's token) is non-blocking, gathered by rank 0 one receive per rank so that it can name the
ranks that did not arrive; ``Dup`` and ``Split`` (blocking in MPI) run under the watchdog.
"""

from __future__ import annotations

import atexit
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
    name_ranks,
    split_by_host,
    timeout_error,
)
from hpc_asgd.env import short_host
from hpc_asgd.errors import CommError, PeerLost, error_line

_WATCH_EVERY = 0.05  # s between the watchdog's looks at blocked collectives
_GRACE = 2.0  # s peers get to answer "where are you?"
_STARTUP_TAG = 0x4A5  # point-to-point tag of the start-up exchange, on COMM_WORLD


_INIT_SETTLE = 0.5  # s between MPI_Init and the first message (see ``mpi_module``)
_settled: list[bool] = []


def mpi_module():
    """The MPI module; importing it initialises MPI, which only rank main processes do.

    Open MPI 5.0 can crash a rank still inside MPI_Init when a faster peer, already out of the
    closing PMIx fence, sends to it (a segfault in mca_pml_ob1_recv_frag_callback_match; seen
    here once in 26 srun jobs across emulated nodes; upstream open-mpi/ompi#11438, PR #13559).
    Every first collective of ours follows MPI_Init at once, so a fresh Open MPI process waits
    a moment before it, which lets the slower peers finish their MPI_Init."""
    # Under ULFM (mpirun --with-ft ulfm), a survivor that learns of a failure tells the others
    # through a reliable broadcast: measured on the emulated cluster (4 nodes, a rank killed
    # while its node's daemon lived), with the runtime's notice alone the rank beside the dead
    # one never learnt of it, 2 runs of 2 (it timed out after --comm-timeout); with this, every
    # survivor went on within 0.01 s. Read at MPI_Init; the environment's value wins.
    os.environ.setdefault("OMPI_MCA_mpi_ft_propagator_with_rbcast", "true")
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


def _sum_16(kind: str):
    """An MPI reduction over 16-bit floats (viewed as 2-byte integers: MPI has no bfloat16):
    each addition in float32, rounded back to nearest (even) once."""
    import numpy as np

    def widen(buf) -> np.ndarray:
        raw = np.frombuffer(buf, dtype=np.uint16)
        if kind == "fp16":
            return raw.view(np.float16).astype(np.float32)
        return (raw.astype(np.uint32) << 16).view(np.float32)

    def add(inbuf, inoutbuf, datatype) -> None:
        total = widen(inbuf) + widen(inoutbuf)  # (n,) float32
        out = np.frombuffer(inoutbuf, dtype=np.uint16)
        if kind == "fp16":
            out[:] = total.astype(np.float16).view(np.uint16)
        else:  # bfloat16: the top 16 bits, rounded to nearest even
            bits = total.view(np.uint32)
            out[:] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)

    return mpi_module().Op.Create(add, commute=True)


_SUMS_16: dict[torch.dtype, object] = {}


def _sum_op(dtype: torch.dtype):
    if dtype not in _SUMS_16:
        _SUMS_16[dtype] = _sum_16("fp16" if dtype == torch.float16 else "bf16")
    return _SUMS_16[dtype]


class _Process:
    """Per-process state shared by every communicator: the status service, the peers'
    addresses (by world rank), the live communicators (by id) and the watchdog thread."""

    def __init__(self, timeout: float) -> None:
        mpi = mpi_module()
        self.comms: weakref.WeakValueDictionary[int, MpiComm] = weakref.WeakValueDictionary()
        self.next_cid = 0
        self.server = status.StatusServer(self._count)
        self.server.start()
        try:
            records = _exchange(mpi.COMM_WORLD, status.encode_address(self.server.port), timeout)
        except CommError:
            # No communicator reaches the caller, so nothing would abort the job; exiting
            # would hang in MPI_Finalize (a fence with the missing ranks). Abort at exit
            # (before mpi4py's finalize), after the caller has printed the error.
            atexit.register(mpi.COMM_WORLD.Abort, 1)
            raise
        self.addresses = [status.decode_address(r) for r in records]
        self.token = self.server.token = status.job_token(records)
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


def _proc(timeout: float) -> _Process:
    if not _process:
        _process.append(_Process(timeout))
    return _process[0]


def _exchange(world, mine: bytes, timeout: float) -> list[bytes]:
    """Every rank's ``mine``, in rank order, within ``timeout`` s (else CommError): rank 0
    receives each rank's record apart, so that it can name the ranks that did not arrive, then
    broadcasts the table. The other ranks give rank 0 a little longer to say it first."""
    rank, size = world.Get_rank(), world.Get_size()
    table = np.zeros((size, status.RECORD), dtype=np.uint8)
    table[rank] = np.frombuffer(mine, dtype=np.uint8)
    if rank == 0:
        recvs = [world.Irecv(table[r], source=r, tag=_STARTUP_TAG) for r in range(1, size)]
        if late := _poll(recvs, timeout):
            raise CommError(
                f"mpi start-up exchange timed out after {timeout:g} s on rank 0: rank(s) "
                f"{name_ranks([i + 1 for i in late])} did not arrive (--comm-timeout)"
            )
        sent = []
    else:
        sent = [world.Isend(table[rank], dest=0, tag=_STARTUP_TAG)]
    if _poll([*sent, world.Ibcast(table, root=0)], timeout + 2 * _GRACE):
        raise CommError(
            f"mpi start-up exchange timed out after {timeout:g} s on rank {rank}: rank 0 did not "
            "send the table (it names the ranks it waits for) (--comm-timeout)"
        )
    return [row.tobytes() for row in table]


def _poll(requests: list, timeout: float) -> list[int]:
    """Test ``requests`` until all complete or ``timeout`` s pass; the incomplete ones' indices."""
    poll = Poller(timeout)
    left = list(range(len(requests)))
    while left := [i for i in left if not requests[i].Test()]:
        if poll.expired():
            return left
        poll.idle()
    return []


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
        self.rank, self.size = base.Get_rank(), base.Get_size()
        self.timeout = timeout
        self.world_ranks = world_ranks or list(range(self.size))
        self.seq = 0  # collectives entered on this communicator
        self.blocked: tuple[str, int, float, float] | None = None  # (what, seq, deadline, timeout)
        self.cuda_aware = cuda_aware()
        self._ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
        self.proc = _proc(timeout)
        self.cid = self.proc.register(self)  # before the Dup: the watchdog sees it blocked there
        # A context of our own: our collectives never match a user's. Collective #1 here.
        self.c = self._blocking("dup", lambda _: base.Dup())

    # ---- buffers -------------------------------------------------------------------------
    def _buf(self, t: torch.Tensor):
        """(buffer MPI reads/writes, staging pair or None). CPU: a zero-copy numpy view."""
        if not t.is_contiguous():
            raise ValueError("collectives need contiguous (flat) tensors")
        if t.dtype in (torch.float16, torch.bfloat16):  # 2-byte words (``_sum_16``)
            host = t.detach().to("cpu")
            return host.view(torch.int16).numpy(), (None if t.device.type == "cpu" else (host, t))
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

    def _blocking(self, what: str, blocking, t: torch.Tensor | None = None):
        """Run MPI's blocking collective under the watchdog's deadline; its result."""
        self.seq += 1
        buf, staged = self._buf(t) if t is not None else (None, None)
        self.blocked = (what, self.seq, time.monotonic() + self.timeout, self.timeout)
        try:
            out = blocking(buf)
        except mpi_module().Exception as e:
            raise self.failure(what, self.seq, e) from None
        finally:
            self.blocked = None
        if staged is not None:
            staged[1].copy_(staged[0])
        return out

    # ---- collectives ---------------------------------------------------------------------
    def _op(self, op: str, t: torch.Tensor):
        if t.dtype in (torch.float16, torch.bfloat16):
            if op != "sum":
                raise ValueError(f"16-bit float allreduce: only 'sum', not {op!r}")
            return _sum_op(t.dtype)
        return self._ops[check_op(op)]

    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> MpiWork:
        mop = self._op(op, t)
        inplace = mpi_module().IN_PLACE
        return self._post("allreduce", lambda b: self.c.Iallreduce(inplace, b, op=mop), t)

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        mop = self._op(op, t)
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
        sub = self._blocking("split", lambda _: self.c.Split(color, key))
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
        answers = status.ask_all(
            {w: self.proc.addresses[w] for w in peers}, self.cid, _GRACE, self.proc.token
        )
        missing = sorted(w for w, n in answers.items() if n is None or n < seq)
        behind = {w: n for w, n in answers.items() if n is not None and 0 <= n < seq}
        hosts = {w: short_host(self.proc.addresses[w][0]) for w in missing}
        return timeout_error(
            self.name, self.world_ranks[self.rank], what, seq, timeout, missing, behind, hosts
        )

    def failure(self, what: str, seq: int, err) -> CommError:
        """MPI reported an error (with Open MPI's ULFM, ``OMPI_MCA_mpi_ft_enable=1``, a dead
        peer gives MPI_ERR_PROC_FAILED instead of aborting this process): the peers that do
        not answer the status service are the ones that failed. A dead peer, or a
        communicator a survivor revoked on seeing one, is :class:`PeerLost`."""
        cls = err.Get_error_class() if hasattr(err, "Get_error_class") else None
        lost = cls is not None and cls in _ft_classes()
        if lost and cls == mpi_module().ERR_REVOKED:  # a survivor saw the failure: no asking
            me = self.world_ranks[self.rank]
            return PeerLost(f"mpi {what} #{seq} on rank {me}: {err.Get_error_string()}")
        peers = {self.world_ranks[r]: r for r in range(self.size) if r != self.rank}
        answers = status.ask_all(
            {w: self.proc.addresses[w] for w in peers}, self.cid, _GRACE, self.proc.token
        )
        dead = sorted(w for w, n in answers.items() if n is None)
        hosts = {w: short_host(self.proc.addresses[w][0]) for w in dead}
        cause = err.Get_error_string() if hasattr(err, "Get_error_string") else str(err)
        line = failure_error(self.name, self.world_ranks[self.rank], what, seq, dead, hosts, cause)
        # Some of Open MPI's collectives (a barrier while a peer died) report the loss as
        # MPI_ERR_OTHER: peers that no longer answer the status service are lost all the same.
        lost = lost or bool(dead and _ft_classes())
        return PeerLost(str(line)) if lost else line

    # ---- shrinking (ULFM: --min-ranks) -------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        """Every job-wide rank's host (from the start-up exchange)."""
        return [short_host(a[0]) for a in self.proc.addresses]

    def revoke_all(self) -> None:
        """Revoke every communicator of this process (ULFM's MPI_Comm_revoke): a peer blocked
        in, or entering, any collective on any of them gets MPI_ERR_REVOKED at once, so every
        survivor reaches :meth:`shrink`, whichever collective it was in."""
        for comm in list(self.proc.comms.values()):
            try:
                comm.c.Revoke()
            except (AttributeError, mpi_module().Exception):  # freed, or not made yet
                pass

    def shrink(self) -> MpiComm:
        """The survivors' communicator (ULFM's MPI_Comm_shrink on this revoked one: every
        survivor gets the same group, the failed ranks left out), its ``world_ranks`` still
        the job-wide ranks. Collective over the survivors; run under the watchdog's deadline."""
        sub = self._blocking("shrink", lambda _: self.c.Shrink())
        out = MpiComm(sub, self.timeout, self._world_ranks_of(sub))
        sub.Free()
        return out

    # ---- replacements (ULFM: --max-ranks) ---------------------------------------------------
    def spawn(self, n: int, command: list[str]) -> MpiComm:
        """Start ``n`` replacement processes (``MPI_Comm_spawn`` of ``command``, where the
        launcher maps them) and return the communicator of this one's members followed by
        them (:func:`join` on their side). Collective over this communicator. (Placed on
        the lost ranks' nodes with the ``host`` info key, Open MPI 5.0.11's replacement
        failed in its MPI_Init: "OPAL ERROR: Not supported in dpm.c", measured on the
        emulated cluster; mpirun's own mapping, its first node, works.)"""
        info = mpi_module().Info.Create()
        info.Set("wdir", os.getcwd())  # relative paths of the command line mean the same there
        inter = self._blocking(
            "spawn",
            lambda _: self.c.Spawn(command[0], command[1:], maxprocs=n, info=info, root=0),
        )
        info.Free()
        merged = self._blocking("merge", lambda _: inter.Merge(high=False))
        inter.Free()
        return _joined(merged, self.proc, self.world_ranks, self.timeout)


def join(timeout: float) -> MpiComm:
    """On a replacement started by :meth:`MpiComm.spawn`: the job's communicator, the members
    that started it first and this process after them; its job-wide rank is the lowest that
    no member holds (a lost rank's). CommError if no job started this process."""
    mpi = mpi_module()
    parent = mpi.Comm.Get_parent()
    if parent == mpi.COMM_NULL:
        raise CommError(
            "join: this process was not started by a running job (MPI_Comm_spawn): --join is "
            "set by the survivors on the replacements they start (--max-ranks)"
        )
    merged = parent.Merge(high=True)
    parent.Free()
    return _joined(merged, _proc(timeout), None, timeout)


_JOIN_HEAD = 16  # bytes before a member's status record: its job-wide rank (-1: a replacement)
# and the job's size (0: not known), both int64


def _joined(merged, proc: _Process, ranks: list[int] | None, timeout: float) -> MpiComm:
    """The job's communicator over ``merged`` (members first, then the replacements, which
    pass ``ranks=None``): every member's status address and job-wide rank gathered, the
    replacements given the lowest free job-wide ranks, the members' table of addresses and
    the job's token (``merged`` rank 0's) sent to them, so that deadlines name ranks and
    hosts as before."""
    me, size = merged.Get_rank(), merged.Get_size()
    width = _JOIN_HEAD + status.RECORD
    rows = np.zeros((size, width), dtype=np.uint8)
    head = np.array([-1 if ranks is None else ranks[me], len(proc.addresses)], dtype=np.int64)
    rows[me, :_JOIN_HEAD] = head.view(np.uint8)
    rows[me, _JOIN_HEAD:] = np.frombuffer(status.encode_address(proc.server.port), np.uint8)
    if _poll([merged.Iallgather(mpi_module().IN_PLACE, rows)], timeout):
        raise CommError(f"join: the members' exchange timed out after {timeout:g} s")
    heads = rows[:, :_JOIN_HEAD].copy().view(np.int64)  # (size, 2)
    n = int(heads[:, 1].max())  # the job's ranks (the members know)
    table = np.zeros((n, status.RECORD), dtype=np.uint8)
    token = np.zeros(64, dtype=np.uint8)  # a sha256 hex digest
    if ranks is not None and me == 0:
        for w, a in enumerate(proc.addresses):
            table[w] = np.frombuffer(status.encode_peer(a), np.uint8)
        token[: len(proc.token)] = np.frombuffer(proc.token, np.uint8)
    if _poll([merged.Ibcast(table, root=0), merged.Ibcast(token, root=0)], timeout):
        raise CommError(f"join: the members' table did not arrive in {timeout:g} s")
    held = {int(w) for w in heads[:, 0] if w >= 0}
    free = iter(w for w in range(n) if w not in held)
    world = [int(w) if w >= 0 else next(free) for w in heads[:, 0]]
    if ranks is None:  # a replacement takes the members' view of the job
        proc.addresses = [status.decode_address(r.tobytes()) for r in table]
        proc.token = proc.server.token = token.tobytes().rstrip(b"\0")
    for r, w in enumerate(world):
        proc.addresses[w] = status.decode_address(rows[r, _JOIN_HEAD:].tobytes())
    comm = MpiComm(merged, timeout, world)
    merged.Free()
    return comm


def _ft_classes() -> tuple[int, ...]:
    """MPI error classes of a failed peer under ULFM (empty where the MPI has none)."""
    mpi = mpi_module()
    names = ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
    return tuple(getattr(mpi, n) for n in names if hasattr(mpi, n))


def library_version() -> str:
    """The MPI library's own version line (for ``hpc-asgd info`` and benchmarks)."""
    return mpi_module().Get_library_version().splitlines()[0].strip().strip("\x00")
