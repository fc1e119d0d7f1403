"""Horovod engine: the same collectives over Horovod's MPI (or Gloo) controller.

Horovod 0.28.1 has to be built against torch >= 2.1 with a C++17 patch: run
``scripts/install_horovod.sh``. Horovod is imported lazily, on first use, so that the rest of
hpc_asgd never needs it.

How the Comm protocol maps onto Horovod:

- Every collective carries an explicit name, ``<comm tag>.<seq>``: Horovod matches operations
  across ranks by name, and its automatic names count the handles of the whole process, which
  differ between ranks as soon as sub-groups run collectives of their own.
- ``split`` and ``split_node`` use Horovod's *process sets*. They are global objects: every rank
  of the job must register every set, in the same order, even the sets it is not in, so only
  splits of the world communicator (which every rank calls) may make new sets; a split of a
  sub-communicator that needs one is refused. Sets are kept and reused: splitting the world
  with one color again is the global set under a new tag. Within a set, Horovod orders ranks
  by global rank, so ``key`` cannot reorder them (as in the torch.distributed engine); every
  caller in hpc_asgd passes key = rank anyway.
- Registering sets: Horovod's *dynamic* process sets (``hvd.add_process_set``) make its
  background thread run an MPI_Allgather every cycle while holding the lock that every
  enqueue takes, with the GIL held: one stopped peer then freezes the other ranks inside
  ``allreduce_async_``, out of reach of any deadline (seen here with SIGSTOP). So when mpi4py
  started MPI (under mpirun), sets are static: a split that needs new ones waits for the
  collectives in flight, shuts Horovod down and starts it again with every set known so far
  (MPI itself stays up; about 10 ms here, at set-up time). Without mpi4py, Horovod
  owns MPI and could not restart it, so dynamic sets are used, with that caveat.
- Deadlines: ``Work.wait`` polls ``hvd.poll`` until the deadline, then asks every peer's
  status service (``status.py``, plain TCP, as the MPI engine does) how many collectives it
  has entered on this communicator: those that do not answer, or answer with a lower count,
  are named. If every member answered, ranks outside the group that do not answer are named
  (each rank's one Horovod thread serves every set in turn, so a rank stuck in one set's
  negotiation, e.g. waiting for a stopped peer, stalls its other sets too). No thread
  but Horovod's own calls MPI after start-up. Horovod cannot withdraw a posted operation, so
  a timed-out collective stays queued: the communicator is marked broken, and
  :func:`shutdown` skips its final barrier and lingers a moment first (the first rank to shut
  Horovod down fails every peer's pending operations with "Horovod has been shut down"; the
  peers whose deadlines are about to pass get to name the missing ranks themselves).
- Shutdown: Horovod ends every rank's pending operations as soon as one rank shuts down, so at
  interpreter exit all ranks first meet in a barrier (under the deadline) and only then shut
  Horovod down (registered with ``atexit`` when the world communicator is made).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
import zlib

import torch

from hpc_asgd.comm import status
from hpc_asgd.comm.base import Comm, Poller, check_op, name_ranks, split_by_host, timeout_error
from hpc_asgd.env import short_host
from hpc_asgd.errors import CommError, ConfigError

_INSTALL_HINT = "run scripts/install_horovod.sh"
_GRACE = 2.0  # s peers get to answer "how far did you get?"


def _hvd():
    """``horovod.torch``, imported on first use, with a readable error when it is missing."""
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ConfigError(f"--comm horovod: Horovod is not installed ({e}); {_INSTALL_HINT}") from e
    return hvd


class _State:
    """Process-wide Horovod state: the registered process sets and the communicators made."""

    def __init__(self) -> None:
        self.sets: dict[tuple[int, ...], object] = {}  # sorted global ranks -> ProcessSet
        self.comms: dict[int, HorovodComm] = {}  # by cid, the same on every member
        self.addresses: list[tuple[str, int]] = []  # status service of each world rank
        self.server: status.StatusServer | None = None
        self.mpi = False  # MPI started through mpi4py: abort with MPI_Abort, static sets
        self.inflight: set[HorovodWork] = set()  # posted, not yet seen complete
        self.world: HorovodComm | None = None
        self.down = False
        self.failed = False  # an uncaught exception is ending this process
        self.timed_out = False  # a deadline passed here: linger before shutting down
        self.lock = threading.Lock()


_state = _State()


class HorovodWork:
    """A posted Horovod operation; ``after`` runs once on completion (copies, reshapes)."""

    def __init__(self, comm: HorovodComm, handle: int, seq: int, what: str, after=None):
        self.comm, self.handle, self.seq, self.what, self.after = comm, handle, seq, what, after
        self.done = False
        self.result: torch.Tensor | None = None  # set by _finish (allgather's output)

    def _finish(self) -> None:
        hvd = _hvd()
        try:
            out = hvd.synchronize(self.handle)  # does not block: poll() said it is complete
        except Exception as e:  # HorovodInternalError: a peer shut down, or the op failed
            self.comm.broken = True
            raise CommError(
                f"horovod {self.what} #{self.seq} failed on rank {self.comm.world_rank}: "
                f"{_first(e)}"
            ) from e
        self.result = self.after(out) if self.after is not None else out
        self.done = True
        _state.inflight.discard(self)

    def test(self) -> bool:
        if not self.done and _hvd().poll(self.handle):
            self._finish()
        return self.done

    def wait(self, timeout: float | None = None, waited: float = 0.0) -> None:
        timeout = self.comm.timeout if timeout is None else timeout
        # Horovod progresses on its own background thread: poll with backoff, so that idle
        # ranks leave the cores to the ranks (and Horovod threads) that work.
        poll = Poller(max(0.0, timeout - waited))
        while not self.test():
            if poll.expired():
                self.comm.broken = True  # Horovod cannot withdraw the operation
                _state.timed_out = True
                raise self.comm.diagnose(self.what, self.seq, timeout)
            poll.idle()


class HorovodComm:
    """A Horovod process set; ``HorovodComm(timeout)`` starts Horovod over the whole job."""

    name = "horovod"

    def __init__(self, timeout: float = 300.0, mpi: bool = True, _parent=None, _members=None):
        self.timeout = timeout
        self.seq = 0  # collectives posted on this communicator
        self.splits = 0  # splits made from it (part of the children's tags)
        self.broken = False  # a wait timed out or failed: skip the final barrier
        if _parent is None:
            self._init_world(mpi)
        else:
            parent, index = _parent  # index: of this group among the split's, the same on members
            self.members = list(_members)
            self.world_rank = parent.world_rank
            self.tag = f"{parent.tag}.{parent.splits}-{index}"
        self.world_ranks = self.members
        self.rank = self.members.index(self.world_rank)
        self.size = len(self.members)
        # The status service's key for this communicator: derived from the tag, so that every
        # member names it alike whatever other groups it belongs to.
        self.cid = zlib.crc32(self.tag.encode()) & 0x7FFFFFFF
        _state.comms[self.cid] = self
        if _parent is None:
            self._exchange_addresses()

    def _init_world(self, mpi: bool) -> None:
        if _state.world is not None:
            raise CommError("horovod: the world communicator exists already (one per process)")
        hvd = _hvd()
        if mpi and not hvd.mpi_built():
            raise ConfigError(
                "--comm horovod: this Horovod was built without MPI, but the job runs under "
                f"an MPI launcher; {_INSTALL_HINT} (it builds Horovod with MPI)"
            )
        try:
            if not mpi:
                raise ImportError
            from mpi4py import MPI  # initialises MPI (THREAD_MULTIPLE) before Horovod does
        except ImportError:
            # Horovod starts MPI itself (or Gloo under horovodrun): it would finalise MPI on
            # shutdown, so sets cannot be static (see the module notes); abort() just exits.
            hvd.init(process_sets="dynamic")
        else:
            _state.mpi = True
            hvd.init(comm=MPI.COMM_WORLD)  # Horovod duplicates COMM_WORLD for its own traffic
        self.members = list(range(hvd.size()))
        self.world_rank = hvd.rank()
        _state.sets[tuple(self.members)] = hvd.global_process_set
        self.tag = "w"
        _state.world = self
        _run_shutdown_first()
        _note_uncaught_exceptions()

    def _exchange_addresses(self) -> None:
        """Start this process's status service and learn every rank's (a Horovod allgather)."""
        _state.server = status.StatusServer(_count)
        _state.server.start()
        mine = torch.frombuffer(
            bytearray(status.encode_address(_state.server.port)), dtype=torch.uint8
        )
        records = [bytes(row.tolist()) for row in self.allgather(mine)]
        _state.addresses = [status.decode_address(r) for r in records]
        _state.server.token = status.job_token(records)

    @property
    def process_set(self):
        """This group's Horovod process set (a new object after each restart)."""
        return _state.sets[tuple(self.members)]

    # ---- posting -------------------------------------------------------------------------
    def _post(self, what: str, start, after=None) -> HorovodWork:
        if _state.down:
            raise CommError(f"horovod {what}: Horovod has been shut down on this rank")
        self.seq += 1  # what the status service tells peers that ask
        name = f"{self.tag}.{self.seq}"
        try:
            handle = start(name)
        except Exception as e:  # HorovodInternalError: Horovod was shut down by a peer
            self.broken = True
            raise CommError(
                f"horovod {what} #{self.seq} failed on rank {self.world_rank}: {_first(e)}"
            ) from e
        work = HorovodWork(self, handle, self.seq, what, after)
        _state.inflight.add(work)
        return work

    def _staged(self, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(tensor Horovod works on, whether it is a host copy of a device tensor)."""
        if not t.is_contiguous():
            raise ValueError("collectives need contiguous (flat) tensors")
        if t.device.type != "cpu" and not _hvd().nccl_built():
            return t.detach().to("cpu"), True
        return t.detach(), False

    # ---- collectives ---------------------------------------------------------------------
    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> HorovodWork:
        hvd = _hvd()
        hop = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}[check_op(op)]
        buf, staged = self._staged(t)

        def start(name: str) -> int:
            return hvd.allreduce_async_(buf, name=name, op=hop, process_set=self.process_set)

        def after(_out):
            if staged:
                t.copy_(buf)

        return self._post("allreduce", start, after)

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        self.iallreduce_(t, op).wait()

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None:
        hvd = _hvd()
        buf, staged = self._staged(t)
        root_world = self.members[root]  # Horovod names the root by its global rank

        def start(name: str) -> int:
            return hvd.broadcast_async_(buf, root_world, name=name, process_set=self.process_set)

        def after(_out):
            if staged:
                t.copy_(buf)

        self._post("broadcast", start, after).wait()

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        hvd = _hvd()
        src, _ = self._staged(t.detach().contiguous())
        one = src.unsqueeze(0)  # Horovod concatenates along dim 0: (size, *shape)

        def start(name: str) -> int:
            return hvd.allgather_async(one, name=name, process_set=self.process_set)

        work = self._post("allgather", start, lambda out: out.to(t.device))
        work.wait()
        assert work.result is not None  # wait() returned: _finish set it
        return work.result

    def barrier(self, timeout: float | None = None) -> None:
        # A named one-element allreduce rather than hvd.barrier(): it can be polled against
        # the deadline like every other collective.
        hvd = _hvd()
        one = torch.zeros(1, dtype=torch.int32)

        def start(name: str) -> int:
            return hvd.allreduce_async_(one, name=name, op=hvd.Sum, process_set=self.process_set)

        self._post("barrier", start).wait(timeout)

    # ---- groups --------------------------------------------------------------------------
    def split(self, color: int, key: int) -> HorovodComm:
        pairs = self.allgather(torch.tensor([color, key], dtype=torch.int64)).tolist()
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, (c, k) in enumerate(pairs):
            groups.setdefault(c, []).append((k, self.members[i]))
        # Horovod sorts a set's ranks: members in ascending global rank, whatever the keys.
        wanted = [tuple(sorted(r for _, r in groups[c])) for c in sorted(groups)]
        new = [g for g in dict.fromkeys(wanted) if g not in _state.sets]
        if new and self is not _state.world:
            # Every member of this communicator reaches the same verdict (same gathered data).
            raise CommError(
                "horovod: split() of a sub-communicator into new groups is not supported "
                "(Horovod process sets must be registered by every rank of the job); split "
                "the world communicator instead"
            )
        if new:  # every rank of the job, the same sets, in the same order
            _register(new)
        self.splits += 1
        index = sorted(groups).index(color)
        return HorovodComm(self.timeout, _parent=(self, index), _members=wanted[index])

    def split_node(self) -> Comm:
        return split_by_host(self, socket.gethostname())

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if _state.mpi:
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # the launcher ends the other ranks on a non-zero exit

    def shutdown(self) -> None:
        """End Horovod on this rank after every rank has arrived (see :func:`shutdown`)."""
        shutdown()

    # ---- deadlines -----------------------------------------------------------------------
    def diagnose(self, what: str, seq: int, timeout: float) -> CommError:
        """Ask every peer how far it got on this communicator; those that do not answer
        within the grace time, or answer with an earlier collective, did not arrive."""
        if not _state.addresses:  # the address exchange itself timed out
            return timeout_error(self.name, self.world_rank, what, seq, timeout, None)
        peers = [w for w in self.members if w != self.world_rank]
        asked = {w: _state.addresses[w] for w in peers}
        answers = status.ask_all(asked, self.cid, _GRACE, _token())
        missing = sorted(w for w, n in answers.items() if n is None or n < seq)
        behind = {w: n for w, n in answers.items() if n is not None and 0 <= n < seq}
        hosts = {w: short_host(host) for w, (host, _) in enumerate(_state.addresses)}
        others = [w for w in range(len(_state.addresses)) if w not in self.members]
        if not missing and others and _state.world is not None:
            # Each rank's one Horovod thread serves every set in turn: a rank outside this
            # group that hangs stalls, through the sets it shares with members, this group.
            asked = {w: _state.addresses[w] for w in others}
            answers = status.ask_all(asked, _state.world.cid, _GRACE, _token())
            silent = sorted(w for w, n in answers.items() if n is None)
            if silent:
                return CommError(
                    f"{self.name} {what} #{seq} timed out after {timeout:g} s on rank "
                    f"{self.world_rank}: rank(s) {name_ranks(silent, hosts)} do not answer "
                    "(outside this group, but Horovod's negotiation of the sets it shares with "
                    "this group's ranks stalls them) (--comm-timeout)"
                )
        return timeout_error(self.name, self.world_rank, what, seq, timeout, missing, behind, hosts)


def _register(new: list[tuple[int, ...]]) -> None:
    """Make Horovod process sets of ``new`` (lists of global ranks), on every rank alike."""
    hvd = _hvd()
    if not _state.mpi:
        for g in new:
            _state.sets[g] = hvd.add_process_set(list(g))
        return
    # Static sets: restart Horovod with every set. Nothing may be in flight across it.
    for work in list(_state.inflight):
        work.wait()
    from mpi4py import MPI

    world = tuple(range(hvd.size()))
    groups = [g for g in _state.sets if g != world] + list(new)
    hvd.shutdown()  # collective: every rank is in this split; MPI stays initialised
    sets = [hvd.ProcessSet(list(g)) for g in groups]
    hvd.init(comm=MPI.COMM_WORLD, process_sets=sets)
    _run_shutdown_first()
    _state.sets = {world: hvd.global_process_set}
    _state.sets.update(zip(groups, sets, strict=True))


def _run_shutdown_first() -> None:
    """(Re-)register :func:`shutdown` with atexit after ``hvd.init``, which registers
    ``hvd.shutdown``: handlers run last-in first-out, so ours (the final barrier) runs first."""
    atexit.unregister(shutdown)
    atexit.register(shutdown)


def _count(cid: int) -> int:
    """The status service's answer: collectives posted on communicator ``cid`` (-1: unknown)."""
    comm = _state.comms.get(cid)
    return -1 if comm is None else comm.seq


def _token() -> bytes:
    """The job's token for the peers' status services (known once the world exchanged it)."""
    return _state.server.token if _state.server is not None and _state.server.token else b"-"


def _first(e: BaseException) -> str:
    """The first sentence of an engine error (Horovod's run over several lines)."""
    text = str(e).strip()
    return text.split(". ")[0].splitlines()[0] if text else type(e).__name__


def _note_uncaught_exceptions() -> None:
    """A process ended by an uncaught exception skips the final barrier: its peers are not
    where it is, and the launcher ends the job on its non-zero exit anyway."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        _state.failed = True
        previous(kind, value, tb)

    sys.excepthook = hook


def shutdown() -> None:
    """Final barrier over the whole job (under the deadline), then ``hvd.shutdown()``.

    Horovod tears down every rank's pending operations as soon as one rank shuts down, so no
    rank may leave while a peer still has a collective in flight. Skipped after a failed or
    timed-out collective (the ranks are out of step: a barrier could only time out); after a
    timeout, the rank lingers ``_GRACE`` s first, so that peers waiting on the same collective
    reach their own deadlines (and name the missing ranks) before Horovod fails their waits.
    Safe to call more than once; registered with ``atexit`` when Horovod starts.
    """
    with _state.lock:
        if _state.down or _state.world is None:
            return
        world = _state.world
        try:
            if not _state.failed and not any(c.broken for c in _state.comms.values()):
                world.barrier()
            elif _state.timed_out:
                time.sleep(_GRACE)
        except CommError as e:
            print(f"hpc-asgd: warning: {e}", file=sys.stderr, flush=True)
        finally:
            _state.down = True
            _hvd().shutdown()
