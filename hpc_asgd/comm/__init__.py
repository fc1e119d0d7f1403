"""Engines behind one seam. ``make_comm`` is the only place that picks one; :func:`init` is
the Python API's door to it (once per process)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time

from hpc_asgd import env
from hpc_asgd.comm.base import Comm, Work
from hpc_asgd.comm.local import LocalComm
from hpc_asgd.env import Launch
from hpc_asgd.errors import ConfigError, HpcAsgdError, error_line

ENGINES = ("auto", "mpi", "gloo", "nccl", "horovod", "local")


def resolve_engine(engine: str, launch: Launch) -> str:
    """``auto``: world size 1 -> local, an MPI launcher -> mpi, otherwise gloo."""
    if engine != "auto":
        return engine
    if launch.joining:  # a replacement joins an MPI job (its own MPI world is of size 1)
        return "mpi"
    if launch.size == 1:
        return "local"
    return "mpi" if launch.under_mpi else "gloo"


def make_comm(engine: str, launch: Launch, timeout: float) -> Comm:
    """Start the chosen engine over the whole job and return its world communicator."""
    engine = resolve_engine(engine, launch)
    if engine == "local":
        if launch.size != 1:
            raise ConfigError(
                f"comm: 'local' runs one process, but the launcher started {launch.size}"
            )
        return LocalComm(timeout)
    if engine == "mpi":
        try:
            from hpc_asgd.comm.mpi import MpiComm, mpi_module
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ConfigError(f"comm: 'mpi' needs mpi4py ({e}); pip install 'hpc_asgd[mpi]'") from e
        mpi_module()  # MPI_Init: the launcher's own start-up, before any deadline of ours
        if launch.joining:  # a replacement, started by a job's survivors (--max-ranks)
            from hpc_asgd.comm.mpi import join

            return join(timeout)
        _startup_fault(launch)
        comm: Comm = MpiComm(timeout=timeout)
        if comm.size != launch.size:
            raise ConfigError(
                f"comm: MPI sees {comm.size} rank(s) but the launcher said {launch.size}: "
                "is mpi4py built against the MPI that launched this job?"
            )
        return comm
    if engine in ("gloo", "nccl"):
        import torch

        if engine == "nccl" and not torch.cuda.is_available():
            raise ConfigError("comm: 'nccl' needs CUDA GPUs; use gloo or mpi on CPU")
        from hpc_asgd.comm.torch_dist import TorchComm

        return TorchComm.init(engine, launch, timeout)
    if engine == "horovod":
        from hpc_asgd.comm.horovod import HorovodComm  # imports Horovod itself only on use

        comm = HorovodComm(timeout, mpi=launch.under_mpi)
        if comm.size != launch.size:
            raise ConfigError(
                f"comm: Horovod sees {comm.size} rank(s) but the launcher said {launch.size}: "
                "is Horovod built against the MPI that launched this job?"
            )
        return comm
    raise ConfigError(f"comm: unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


_started: list[tuple[Comm, Launch]] = []  # the world communicator :func:`init` made, if any
_hooked: list[bool] = []  # :func:`init` installed its ``sys.excepthook``


def init(engine: str = "auto", *, timeout: float = 300.0, abort_on_error: bool = True) -> Comm:
    """Start the communication engine over the job the launcher started and return its world
    communicator (:class:`Comm`): the first call of a training script of your own.

    The ranks come from the launcher (``mpirun``, ``srun``, ``torchrun``; alone: world size
    1, the same code path). ``engine``: ``auto`` (world size 1: ``local``; an MPI launcher:
    ``mpi``; otherwise ``gloo``), ``mpi``, ``gloo``, ``nccl``, ``horovod`` or ``local``.
    ``timeout``: the deadline, in seconds, of every wait on a collective; past it the error
    names the ranks that did not arrive. Once per process (a second call is an error: the
    engine starts once).

    ``abort_on_error``: an exception that leaves the script on one rank ends every rank at
    once (as ``python -m mpi4py`` does), instead of leaving its peers to wait in their next
    collective until the deadline: hpc_asgd's own errors print one line naming the rank and
    the cause (a configuration error: exit status 2, printed once), others their traceback
    too (exit status 1).
    """
    if _started:
        raise ConfigError(
            "hpc_asgd.init(): called twice in this process; the engine starts once "
            "(keep the Comm the first call returned)"
        )
    launch = env.detect()
    if abort_on_error and not _hooked:  # first: a bad argument below is one line, exit 2
        _abort_on_error(launch)
    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown {engine!r}; choose one of {', '.join(ENGINES)}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"timeout: must be a positive number of seconds, got {timeout!r}")
    comm = make_comm(engine, launch, float(timeout))
    _started.append((comm, launch))
    return comm


def current() -> Comm | None:
    """The world communicator :func:`init` returned in this process (None before)."""
    return _started[0][0] if _started else None


def _abort_on_error(launch: Launch) -> None:
    """``sys.excepthook``: an uncaught exception ends every rank of the job, one line first."""
    previous = sys.excepthook

    def hook(kind, err, tb) -> None:
        config = isinstance(err, ConfigError)
        if not isinstance(err, (HpcAsgdError, KeyboardInterrupt)):
            previous(kind, err, tb)  # not ours: the script's own bug, with its traceback
        rank, size = launch.rank, launch.size
        line = error_line(rank, size, err, launch.hostname)
        if config:
            # Every rank meets the same configuration: rank 0 says it once; another rank
            # speaks only if rank 0 did not end the job first (then it failed alone).
            if rank == 0:
                line = f"hpc-asgd: error: {err}"
            else:
                time.sleep(1.0)
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        code = 2 if config else 1
        comm = current()
        if comm is not None and comm.size > 1:
            comm.abort(code)  # no peer waits for this rank until its deadline
        os._exit(code)

    sys.excepthook = hook
    _hooked.append(True)


def _startup_fault(launch: Launch) -> None:
    """``HPC_ASGD_FAULT=startstop@RANK:0``: that rank stops (SIGSTOP) before the engine's
    start-up exchange, as a rank that hangs while starting does; its peers' deadline fires."""
    f = launch.fault
    if f is not None and f.kind == "startstop" and f.rank == launch.rank:
        os.kill(os.getpid(), signal.SIGSTOP)


__all__ = [
    "ENGINES",
    "Comm",
    "LocalComm",
    "Work",
    "current",
    "init",
    "make_comm",
    "resolve_engine",
]
