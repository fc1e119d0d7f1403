"""W worker processes per rank training one shared model; the rank's main process supervises.

Workers are spawned (never forked: the parent has initialised MPI, and children must not), so
they never import mpi4py. They share, through torch's shared memory: the flat model buffer,
the update rule's state, a control block of atomic cells and a stats table. A worker claims
node steps from the control block, as long as they are below ``limit`` (the main process
lowers it to pause workers at a blocking averaging round) and ``total``.

Supervision: the main process polls its workers; one that dies or raises ends the rank with
one line naming rank, worker, pid and exit code or signal. Workers die with their parent
(PR_SET_PDEATHSIG), ignore Ctrl-C (the parent stops them), and are killed on any exit path.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from hpc_asgd.env import Launch
from hpc_asgd.errors import HpcAsgdError
from hpc_asgd.shm.base import AtomicArray, UpdateRule

# Control cells: next unclaimed node step, steps done, the limit workers may not pass (0 until
# every worker is ready, so that none starts seconds ahead), stop request, workers ready.
NEXT, DONE, LIMIT, STOP, READY = range(5)
NCTL = 5
START_TIMEOUT = 300.0
WORKER_NICE = 5  # s for W workers to spawn, import torch and build their model


class WorkerError(HpcAsgdError):
    """A worker process died or raised."""


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
    """Everything a worker needs; pickled to it at spawn (tensors travel as shared memory)."""

    config: dict
    launch: Launch
    rank: int
    world: int
    data: object  # hpc_asgd.data.Dataset
    flat_data: torch.Tensor  # the rank's shared flat buffer
    rule: UpdateRule
    ctl: AtomicArray
    stats: torch.Tensor  # (W, NSTATS) float64
    total: int
    threads: int
    device: str
    errors: object  # a spawn-context SimpleQueue of (worker, message): written synchronously


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the parent's cleanup still kills us
        pass


def worker_main(index: int, spec: WorkerSpec) -> None:
    """Entry point of worker ``index`` (a spawned process)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Below the rank's main process, which must answer at once when it wakes to drive an
    # averaging round (on an oversubscribed node it would otherwise wait for a time slice).
    os.nice(WORKER_NICE)
    try:
        from hpc_asgd.config import Config
        from hpc_asgd.data import ShardSampler
        from hpc_asgd.flat import FlatModel
        from hpc_asgd.models import build_model
        from hpc_asgd.step import Stepper, inject, slow_factor

        torch.set_num_threads(spec.threads)
        cfg = Config.from_flat(spec.config)
        data = spec.data
        model = build_model(cfg.model.model, data.input_shape, data.num_classes)
        flat = FlatModel(model, data=spec.flat_data)  # adopt the shared buffer, no copy
        spec.rule.attach(index)
        sampler = ShardSampler(
            len(data.train), spec.rank, spec.world, cfg.data.batch_size, cfg.run.seed
        )
        gen = torch.Generator().manual_seed(augment_seed(cfg.run.seed, spec.rank, index))
        device = torch.device(spec.device)
        stepper = Stepper(
            cfg,
            data,
            flat,
            spec.rule,
            sampler,
            gen,
            device,
            spec.stats[index],
            None,
            slow_factor(cfg, spec.rank),
        )
        model.train()
        spec.ctl[READY].inc()
        while (s := claim(spec.ctl, spec.total)) is not None:
            inject(spec.launch.fault, spec.rank, s)
            stepper.step(s)
            spec.ctl[DONE].inc()
    except BaseException as e:
        spec.errors.put((index, f"{type(e).__name__}: {e}"))
        os._exit(1)


def augment_seed(seed: int, rank: int, worker: int) -> int:
    """Augmentation draws differ per rank and worker; worker 0 matches the in-process path."""
    return seed * 7919 + rank + 104_729 * worker


class WorkerPool:
    """Spawns, supervises and stops the workers of one rank."""

    def __init__(self, spec: WorkerSpec, workers: int, ctx):
        self.spec, self.n, self.ctx = spec, workers, ctx
        self.procs: list = []
        self.checked = 0.0  # monotonic time of the last check by :meth:`poll`

    def start(self) -> None:
        # USR1 (SLURM's preemption warning) is for the rank's main process; workers inherit
        # SIG_IGN through exec, so they are never killed by its default action.
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            for i in range(self.n):
                p = self.ctx.Process(target=worker_main, args=(i, self.spec), name=f"hpc-asgd-w{i}")
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
            raise WorkerError(f"rank {self.spec.rank} worker {i} (pid {p.pid}) {what}")

    def poll(self, every: float = 0.05) -> None:
        """:meth:`check`, at most once per ``every`` seconds (the supervisor's loop is hot)."""
        if time.monotonic() - self.checked > every:
            self.check()
            self.checked = time.monotonic()

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


def spawn_context():
    return mp.get_context("spawn")
