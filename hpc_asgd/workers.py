"""W worker processes per rank training one shared model; the rank's main process supervises.

Workers are spawned (never forked: the parent has initialised MPI, and children must not), so
they never import mpi4py. They share, through torch's shared memory: the flat model buffer,
the update rule's state, a control block of atomic cells and a stats table. A worker claims
node steps from the control block, as long as they are below ``limit`` (the main process
lowers it to pause workers at a blocking averaging round) and ``total``.

Supervision: the main process sleeps on a semaphore that the worker completing the step an
event waits for posts (or at most 50 ms, less while rounds overlap the steps), and checks its
workers at each wake-up; one that dies or raises ends the rank with
one line naming rank, worker, pid and exit code or signal, and one that stops taking steps
(SIGSTOP, a hung device call) ends it after ``--comm-timeout`` s (:meth:`WorkerPool.watch`).
Workers die with their parent (PR_SET_PDEATHSIG, armed before they import torch: see
``hpc_asgd.worker_entry``), ignore Ctrl-C (the parent stops them), and are killed on any exit
path.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection, forkserver, resource_tracker
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp
from torch import nn

from hpc_asgd import worker_entry
from hpc_asgd.errors import HpcAsgdError
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import AtomicArray, UpdateRule
from hpc_asgd.step import StepSpec

if TYPE_CHECKING:
    from multiprocessing.queues import SimpleQueue

    from hpc_asgd.sync import Synchronizer

# Control cells: next unclaimed node step, steps done, the limit workers may not pass (0 until
# every worker is ready, so that none starts seconds ahead), stop request, workers ready.
NEXT, DONE, LIMIT, STOP, READY = range(5)
NCTL = 5
START_TIMEOUT = 300.0
WORKER_NICE = 5  # s for W workers to spawn, import torch and build their model


class WorkerError(HpcAsgdError):
    """A worker process died, raised or stalled; ``worker``, ``pid`` and ``exitcode``
    (negative: the signal; None: still running) name the first one, for ``failure.json``."""

    def __init__(
        self, message: str, worker: int | None = None, pid: int | None = None, exitcode=None
    ):
        super().__init__(message)
        self.worker, self.pid, self.exitcode = worker, pid, exitcode


def claim(ctl: AtomicArray, total: int) -> int | None:
    """The next node step for this worker, waiting while ``limit`` holds it; None at the end."""
    nap = 0.0
    while True:
        if ctl[STOP].load():
            return None
        s = ctl[NEXT].load()
        if s >= total:
            return None
        if s >= ctl[LIMIT].load():  # paused for a blocking round
            time.sleep(nap)
            nap = min(1e-3, nap * 2 or 2e-5)
            continue
        if ctl[NEXT].cas(s, s + 1):
            return s


@dataclass
class WorkerSpec:
    """Everything a worker needs; pickled to it at spawn (tensors travel as shared memory,
    functions by reference: the worker imports the model factory's module itself)."""

    rank: int
    model: Callable[[], nn.Module]  # builds the module that adopts the shared flat buffer
    step: StepSpec  # how to make its steps: data, loss, optimizer, schedule, delays
    flat_data: torch.Tensor  # the rank's shared flat buffer
    rule: UpdateRule
    ctl: AtomicArray
    stats: torch.Tensor  # (W, NSTATS) float64
    total: int
    threads: int
    device: str
    comm_timeout: float  # s: the peers' deadline on a collective (the stall deadline's base)
    # a spawn-context SimpleQueue of (worker, message): written synchronously
    errors: SimpleQueue[tuple[int, str]]
    # (W,) int64, shared: 1 + the node step each worker is in, 0 between steps (WorkerPool sets it)
    busy: torch.Tensor | None = None
    # (1,) float64, shared: the job's progress minus the node step (``rounds.Budget.offset``)
    offset: torch.Tensor | None = None
    # posted by the worker whose step brings DONE to LIMIT: the main process has work there
    wake: Any = None


def worker_main(index: int, spec: WorkerSpec) -> None:
    """Worker ``index``'s life, in a spawned process (started by ``worker_entry.main``, which
    has tied it to the rank's main process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Below the rank's main process, which must answer at once when it wakes to drive an
    # averaging round (on an oversubscribed node it would otherwise wait for a time slice).
    os.nice(WORKER_NICE)
    try:
        torch.set_num_threads(spec.threads)
        model = spec.model()
        flat = FlatModel(model, data=spec.flat_data)  # adopt the shared buffer, no copy
        spec.rule.attach(index)
        device = torch.device(spec.device)
        stepper = spec.step.stepper(flat, spec.rule, spec.stats[index], device, worker=index)
        if spec.offset is not None:
            stepper.offset = spec.offset.numpy()
        model.train()
        assert spec.busy is not None  # WorkerPool set it before spawning
        busy = spec.busy.numpy()
        spec.ctl[READY].inc()
        while (s := claim(spec.ctl, spec.total)) is not None:
            busy[index] = s + 1  # step numbers are unique: the same value means the same step
            stepper.step(s)
            busy[index] = 0
            if spec.ctl[DONE].fetch_inc() + 1 == spec.ctl[LIMIT].load() and spec.wake:
                spec.wake.release()  # the event's step: wake the main process now
    except BaseException as e:
        spec.errors.put((index, f"{type(e).__name__}: {e}"))
        os._exit(1)


class WorkerPool:
    """Spawns, supervises and stops the workers of one rank."""

    def __init__(self, spec: WorkerSpec, workers: int, ctx, stall_timeout: float | None = None):
        self.spec, self.n, self.ctx = spec, workers, ctx
        if spec.busy is None:
            spec.busy = torch.zeros(workers, dtype=torch.int64).share_memory_()
        # Three quarters of --comm-timeout: a peer waiting for this rank in a collective starts
        # its own deadline later, but often by only a step; the rank that knows which worker
        # stalled should speak (and record failure.json) first.
        self.stall_timeout = stall_timeout or 0.75 * spec.comm_timeout
        self.procs: list = []
        self.checked = 0.0  # monotonic time of the last check by :meth:`poll`
        self.node_seen: tuple | None = None  # (DONE, LIMIT, *busy) at the last watch
        self.node_since = 0.0  # ... unchanged since then
        self.worker_seen = [0] * workers  # busy cells at the last watch
        self.worker_since = [0.0] * workers

    def start(self) -> None:
        # USR1 (SLURM's preemption warning) is for the rank's main process; workers inherit
        # SIG_IGN through exec, so they are never killed by its default action.
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            parent = _parent_pid(self.ctx)
            for i in range(self.n):
                # The spec travels sealed: see hpc_asgd.worker_entry (orphans of a killed rank).
                args = (i, parent, worker_entry.Sealed(self.spec))
                p = self.ctx.Process(target=worker_entry.main, args=args, name=f"hpc-asgd-w{i}")
                p.start()
                self.procs.append(p)
        finally:
            signal.signal(signal.SIGUSR1, previous)

    def check(self) -> None:
        """Raise WorkerError if a worker died or raised (exit 0 is a worker that finished)."""
        for i, p in enumerate(self.procs):
            code = p.exitcode
            if code is None or code == 0:
                continue
            message = self._message(i)
            if code < 0:
                what = f"was killed by signal {signal.Signals(-code).name}"
            else:
                what = f"exited with code {code}" + (f": {message}" if message else "")
            raise WorkerError(
                f"rank {self.spec.rank} worker {i} (pid {p.pid}) {what}", i, p.pid, code
            )

    def poll(self, every: float = 0.05) -> bool:
        """:meth:`check` and :meth:`watch`, at most once per ``every`` seconds (the
        supervisor's loop is hot); True when they ran."""
        if time.monotonic() - self.checked <= every:
            return False
        self.check()
        self.watch()
        self.checked = time.monotonic()
        return True

    def watch(self, now: float | None = None) -> None:
        """Raise WorkerError when node steps stopped for ``stall_timeout`` s: a worker has been
        in the same step that long, or nothing moved (DONE, the steps workers are in) while the
        workers may step (DONE below LIMIT, no STOP). A worker held at LIMIT (the main process
        averages, evaluates or checkpoints) is between steps, and a new LIMIT restarts the
        node's clock, so holds do not count. The clocks compare the states seen at successive
        calls, so a main process that was itself away long (a blocking round) sees a stall
        only if it lasted throughout."""
        now = time.monotonic() if now is None else now
        ctl, limit = self.spec.ctl, self.stall_timeout
        assert self.spec.busy is not None  # set in __init__
        busy = self.spec.busy.tolist()
        # Any change restarts the node's clock (a worker inside a step has a clock of its own).
        node = (ctl[DONE].load(), ctl[LIMIT].load(), *busy)
        if node != self.node_seen or node[0] >= node[1] or ctl[STOP].load():
            self.node_seen, self.node_since = node, now
        stuck = []
        for i, b in enumerate(busy):
            if b != self.worker_seen[i] or b == 0:
                self.worker_seen[i], self.worker_since[i] = b, now
            elif now - self.worker_since[i] > limit:
                stuck.append(i)
        if not stuck and now - self.node_since <= limit:
            return
        # The node stalled with no worker inside a step (stopped as it claimed one): name all.
        stuck = stuck or [i for i, b in enumerate(self.worker_seen) if b] or list(range(self.n))
        who = ", ".join(f"worker {i} (pid {self.procs[i].pid})" for i in stuck)
        raise WorkerError(
            f"rank {self.spec.rank} {who} took no node step in {limit:g} s "
            "(stopped? SIGSTOP, a hung device call) (--comm-timeout)",
            stuck[0],
            self.procs[stuck[0]].pid,
        )

    def _message(self, index: int) -> str:
        found = ""
        while not self.spec.errors.empty():
            i, msg = self.spec.errors.get()
            if i == index:
                found = msg
        return found

    def wait_ready(self) -> None:
        """Block until every worker has built its model and is about to claim steps."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.spec.ctl[READY].load() < self.n:
            self.check()
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"rank {self.spec.rank}: only {self.spec.ctl[READY].load()} of {self.n} "
                    f"workers started within {START_TIMEOUT:g} s"
                )
            time.sleep(0.01)

    def join(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            p.join(timeout)
        self.check()

    def stop(self) -> None:
        """Stop every worker now (any exit path): ask, then terminate, then kill."""
        self.spec.ctl[STOP].store(1)
        deadline = time.monotonic() + 2.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)


# Imported once by the rank's fork server, so that no worker imports them (torch: seconds).
# The guard comes first: it ties the server's life to the rank's main process. The caller adds
# the modules its workers' factories and splits live in (``preload``).
PRELOAD = (
    "hpc_asgd.forkserver_guard",
    "torch",
    "hpc_asgd.workers",
    "hpc_asgd.flat",
    "hpc_asgd.step",
)


_preload: list[str] = []


def spawn_context(preload: Sequence[str] = ()):
    """The workers' start method: a fork server per rank, and each worker a fork of it, ready
    in a fraction of a second where a spawned interpreter took seconds to import torch.

    The server never has MPI: the CLI forks it before MPI starts, with torch and hpc_asgd
    imported (:func:`start_early`); otherwise multiprocessing starts it by exec, and it imports
    torch and the worker's modules (:data:`PRELOAD`, and ``preload``) once, while the rank
    loads its data. So no worker imports mpi4py. Shared tensors, queues and locks reach the
    workers as for spawn (their file descriptors travel through the server's socket)."""
    if preload:  # the caller's modules, kept for the server's restarts (``_parent_pid``)
        _preload[:] = preload
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *_preload])
    return ctx


def start_early(fork: bool = False, preload: Sequence[str] = ()) -> None:
    """Start this process's fork server now (nothing if one runs).

    By exec (default): the server's imports overlap the caller's next seconds. With ``fork``, a
    fork of this process becomes the server, with torch and hpc_asgd already imported: no
    import at all. Only before MPI, CUDA or any communication engine has started (the CLI,
    before it starts the engine, on CPU): the server and its workers must share none of their
    state; with mpi4py already imported it starts by exec all the same. Call from the main
    thread, as the only thread running Python: the server dies with the thread that started it.
    """
    spawn_context(preload)
    # SLURM's USR1 (preemption warning) is for the rank's main process: the server, and
    # through it every worker, inherits SIG_IGN, never its default action (death).
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        if fork and "mpi4py" not in sys.modules and _server_fields():
            _fork_server()
        else:
            forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGUSR1, previous)


_FIELDS = ("_lock", "_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")


def _server_fields() -> bool:
    """Whether multiprocessing's fork server has the fields :func:`_fork_server` fills (they
    are internal; 3.11 to 3.13, and 3.14 with its authentication key); else it starts by exec."""
    fs: Any = forkserver._forkserver  # multiprocessing's own (internal fields)
    return all(hasattr(fs, f) for f in _FIELDS) and hasattr(forkserver, "main")


def _fork_server() -> None:
    """:meth:`multiprocessing.forkserver.ForkServer.ensure_running`, with the server forked from
    this process instead of started by exec; multiprocessing then uses it as its own."""
    fs: Any = forkserver._forkserver  # multiprocessing's own (internal fields)
    with fs._lock:
        if fs._forkserver_pid is not None:
            pid, _ = os.waitpid(fs._forkserver_pid, os.WNOHANG)
            if not pid:
                return  # still running
            os.close(fs._forkserver_alive_fd)
            fs._forkserver_address = fs._forkserver_alive_fd = fs._forkserver_pid = None
        resource_tracker.ensure_running()  # shared with the server, as with one started by exec
        parent = os.getpid()
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
            listener.bind(address)
            if not mp_util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()  # EOF for the server when this process ends
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the server: never returns
                code = 1
                try:
                    os.close(alive_w)
                    if worker_entry.arm_death_signal(parent):
                        # The handlers of the rank's main process are not the workers'.
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                        forkserver.main(listener.fileno(), alive_r, [])
                        code = 0
                except SystemExit:  # the main process ended
                    code = 0
                finally:
                    os._exit(code)
            os.close(alive_r)
        fs._forkserver_address, fs._forkserver_alive_fd, fs._forkserver_pid = address, alive_w, pid
        if hasattr(fs, "_forkserver_authkey"):  # 3.14: no key, the socket is private (0600)
            fs._forkserver_authkey = None


def stop_server() -> None:
    """Stop this process's fork server and reap it, once its workers are gone: its CPU time
    and its workers' (which it reaped) then count as this process's children's
    (``getrusage(RUSAGE_CHILDREN)``, what a benchmark or a batch system accounts); a server
    left to end with this process would be reaped by nobody. The next run starts another."""
    fs: Any = forkserver._forkserver  # multiprocessing's own (internal fields)
    if getattr(fs, "_forkserver_pid", None) is not None and hasattr(fs, "_stop"):
        fs._stop()


def _parent_pid(ctx) -> int:
    """The pid a worker's parent has: the fork server's, or this process's (spawn)."""
    if ctx.get_start_method() != "forkserver":
        return os.getpid()
    start_early()  # the pid of the server that forks the workers (restarted if it died)
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    assert isinstance(pid, int), pid
    return pid


SUPERVISE_S = 5e-2  # s: the longest the main process sleeps (the workers' checks, 20 a second)


def nap(sync: Synchronizer) -> float:
    """The longest the supervising loop may sleep before it looks again: 50 ms, less when the
    synchroniser's rounds need this process sooner (``sync.nap_s``: 1 ms for overlapping
    rounds, local-async's paced agreements tell their own). A fixed 0.2 ms poll had woken
    this process 5,000 times a second on a node whose cores the workers need; the events
    themselves wake it at once (``WorkerSpec.wake``)."""
    return min(SUPERVISE_S, sync.nap_s())
