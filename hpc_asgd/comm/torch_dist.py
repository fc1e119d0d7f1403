"""torch.distributed engine: Gloo on CPU, NCCL on GPU.

Bootstrapped from the launcher: torchrun's MASTER_ADDR/PORT (where torchrun's agent hosts the
store), SLURM's first node, or, under ``mpirun`` with mpi4py present, rank 0's host and a free
port broadcast over MPI.

Deadlines: a rank that has waited on collective #n for more than 0.1 s writes "at n" to the
rendezvous store (collectives that finish fast cost nothing). When a wait passes its deadline
the rank reads every peer's mark: the peers still below n are the ones that did not arrive.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist

from hpc_asgd.comm.base import (
    Comm,
    Poller,
    check_op,
    failure_error,
    gather_hosts,
    split_by_host,
    timeout_error,
)
from hpc_asgd.env import Launch
from hpc_asgd.errors import CommError

_MARK_AFTER = 0.1  # s of waiting after which a rank records its arrival in the store
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_LIVE: list[TorchComm] = []  # every group this process made, for :func:`shutdown`


def shutdown() -> None:
    """Destroy every process group before the interpreter finalizes (registered with atexit).

    Why: a Gloo thread drops its reference to a finished collective's tensors a moment after
    the collective completes. When that reference is the last one and falls after Python began
    finalizing, the thread needs the GIL, is unwound by ``pthread_exit`` and the process aborts
    ("terminate called without an active exception") after a run that succeeded. Destroying
    the groups joins those threads while Python still runs. Skipped while a collective is in
    flight: destroying would wait for its peers (that is an error path, which exits anyway).
    """
    if not dist.is_initialized():
        return
    if any(c.last is not None and not c.last.is_completed() for c in _LIVE):
        return
    _LIVE.clear()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous(launch: Launch) -> tuple[str, int]:
    if launch.master_addr and launch.master_port:
        return launch.master_addr, launch.master_port
    if launch.under_mpi:
        from hpc_asgd.comm.mpi import mpi_module

        MPI = mpi_module()  # noqa: N806 (the module's usual name)
        addr = (socket.gethostname(), _free_port()) if launch.rank == 0 else None
        return MPI.COMM_WORLD.bcast(addr, root=0)
    if launch.master_addr:
        return launch.master_addr, 29500
    raise CommError(
        "torch.distributed needs a rendezvous: run under mpirun (with mpi4py), srun, or "
        "torchrun, or set MASTER_ADDR and MASTER_PORT"
    )


def _connect_store(
    launch: Launch, addr: str, port: int, timeout: datetime.timedelta
) -> dist.TCPStore:
    """The rendezvous store: hosted by rank 0, unless torchrun's agent hosts it already.

    Under torchrun the agent has bound MASTER_PORT for its own store; a rank 0 that tried to
    host another would fail to bind, and torch would log that failure as an error line before
    ignoring it. Connecting as a client, as torch's env:// rendezvous does, uses the agent's.
    """
    host = launch.rank == 0 and not launch.agent_store
    return dist.TCPStore(addr, port, launch.size, host, timeout=timeout)


class TorchWork:
    def __init__(self, comm: TorchComm, work, seq: int, what: str, after=None):
        self.comm, self.work, self.seq, self.what, self.after = comm, work, seq, what, after
        self.done = False

    def test(self) -> bool:
        if not self.done and self.work.is_completed():
            try:
                self.work.wait()  # surfaces an engine error, if any
            except RuntimeError as e:  # a peer's connection broke: its process or node died
                raise self.comm.failure(self.what, self.seq, e) from None
            if self.after is not None:
                self.after()
            self.done = True
        return self.done

    def wait(self, timeout: float | None = None, waited: float = 0.0) -> None:
        timeout = self.comm.timeout if timeout is None else timeout
        left = max(0.0, timeout - waited)
        if self.comm.name == "gloo":
            # Gloo progresses on its own threads: block in C++ (no polling that would steal
            # the cores from them), first briefly, then, having marked arrival, until the deadline.
            first = min(_MARK_AFTER, left)
            if not self._wait_for(first):
                self.comm.mark(self.seq)
                if not self._wait_for(left - first):
                    raise self.comm.diagnose(self.what, self.seq, timeout)
            self.test()
            return
        poll = Poller(left)
        mark_at = time.monotonic() + _MARK_AFTER
        while not self.test():
            if mark_at and time.monotonic() > mark_at:
                self.comm.mark(self.seq)
                mark_at = 0.0
            if poll.expired():
                raise self.comm.diagnose(self.what, self.seq, timeout)
            poll.idle()

    def _wait_for(self, seconds: float) -> bool:
        """True if the work completed within ``seconds`` (Gloo leaves it running otherwise)."""
        try:
            self.work.wait(datetime.timedelta(seconds=max(seconds, 1e-3)))
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                return False
            raise self.comm.failure(self.what, self.seq, e) from None
        return True


class TorchComm:
    """A process group (the default one, or a sub-group made by :meth:`split`)."""

    def __init__(
        self,
        backend: str,
        store,
        group=None,
        world_ranks: list[int] | None = None,
        timeout: float = 300.0,
        tag: str = "world",
    ):
        self.name = backend
        self.store = store  # the rendezvous TCPStore, also the arrival board for deadlines
        self.group = group
        self.world_ranks = (
            world_ranks if world_ranks is not None else list(range(dist.get_world_size()))
        )
        self.rank = self.world_ranks.index(dist.get_rank())
        self.size = len(self.world_ranks)
        self.timeout = timeout
        self.tag = tag
        self.seq = 0
        self.last = None  # the newest collective's engine Work (they complete in order)
        _LIVE.append(self)
        self.hosts: list[str] = []  # every world rank's host (set by ``init``, shared by splits)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    @classmethod
    def init(cls, backend: str, launch: Launch, timeout: float) -> TorchComm:
        if backend == "nccl" and launch.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(launch.local_rank)
        addr, port = _rendezvous(launch)
        # The engine's own deadline sits past ours so that ours, which names ranks, fires first.
        engine_timeout = datetime.timedelta(seconds=timeout + 60)
        store = _connect_store(launch, addr, port, engine_timeout)
        dist.init_process_group(
            backend, store=store, rank=launch.rank, world_size=launch.size, timeout=engine_timeout
        )
        atexit.register(shutdown)
        comm = cls(backend, store, None, None, timeout)
        comm.hosts = gather_hosts(comm, launch.hostname)  # by world rank, for error lines
        return comm

    def _post(self, what: str, work, after=None) -> TorchWork:
        self.seq += 1
        self.last = work
        return TorchWork(self, work, self.seq, what, after)

    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> TorchWork:
        w = dist.all_reduce(t, op=_OPS[check_op(op)], group=self.group, async_op=True)
        return self._post("allreduce", w)

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        self.iallreduce_(t, op).wait()

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None:
        w = dist.broadcast(t, src=self.world_ranks[root], group=self.group, async_op=True)
        self._post("broadcast", w).wait()

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        src = t.detach().contiguous().to(self.device)
        parts = [torch.empty_like(src) for _ in range(self.size)]
        self._post("allgather", dist.all_gather(parts, src, group=self.group, async_op=True)).wait()
        return torch.stack(parts).to(t.device)

    def barrier(self) -> None:
        self._post("barrier", dist.barrier(group=self.group, async_op=True)).wait()

    def split(self, color: int, key: int) -> TorchComm:
        # Every rank must create every group, in the same order (torch.distributed's rule).
        # Group ranks follow ascending global rank, so ``key`` only breaks ties among equals.
        pairs = self.allgather(torch.tensor([color, key], dtype=torch.int64)).tolist()
        mine = None
        for c in sorted({c for c, _ in pairs}):
            members = sorted(self.world_ranks[i] for i, (ci, _) in enumerate(pairs) if ci == c)
            group = dist.new_group(members, timeout=datetime.timedelta(seconds=self.timeout + 60))
            if c == color:
                mine = TorchComm(
                    self.name, self.store, group, members, self.timeout, f"{self.tag}.{c}"
                )
                mine.hosts = self.hosts
        assert mine is not None
        return mine

    def split_node(self) -> Comm:
        return split_by_host(self, socket.gethostname())

    def abort(self, code: int = 1) -> None:
        # No MPI_Abort here: exiting non-zero makes mpirun, srun (--kill-on-bad-exit) or
        # torchrun end the other ranks.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # ---- deadlines -----------------------------------------------------------------------
    def mark(self, seq: int) -> None:
        self.store.set(f"hpc_asgd/{self.tag}/at/{self.world_ranks[self.rank]}", str(seq))

    def failure(self, what: str, seq: int, err: Exception) -> CommError:
        """Gloo ended a collective with an error, typically "Connection closed by peer
        [ADDRESS]:PORT" when a peer's process or node died: name the ranks at that address."""
        dead: list[int] = []
        m = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", str(err))
        if m and self.hosts:
            for r in self.world_ranks:
                try:
                    ips = {a[4][0] for a in socket.getaddrinfo(self.hosts[r], None)}
                except OSError:
                    continue
                if m.group(1) in ips and r != self.world_ranks[self.rank]:
                    dead.append(r)
        hosts = {r: self.hosts[r] for r in dead}
        me = self.world_ranks[self.rank]
        # "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [...]:N. This is..."
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(err).splitlines()[0]).split(". ")[0]
        return failure_error(self.name, me, what, seq, dead, hosts, cause)

    def diagnose(self, what: str, seq: int, timeout: float) -> CommError:
        store = self.store
        missing, behind, hosts = [], {}, {}
        for r in self.world_ranks:
            if r == self.world_ranks[self.rank]:
                continue
            key = f"hpc_asgd/{self.tag}/at/{r}"
            at = int(store.get(key)) if store.check([key]) else 0
            if at < seq:
                missing.append(r)
                if at:
                    behind[r] = at
                if self.hosts:
                    hosts[r] = self.hosts[r]
        return timeout_error(
            self.name, self.world_ranks[self.rank], what, seq, timeout, missing, behind, hosts
        )
