"""Engines behind one seam. ``make_comm`` is the only place that picks one."""

from __future__ import annotations

import os
import signal

from hpc_asgd.comm.base import Comm, Work
from hpc_asgd.comm.local import LocalComm
from hpc_asgd.env import Launch
from hpc_asgd.errors import ConfigError

ENGINES = ("auto", "mpi", "gloo", "nccl", "horovod", "local")


def resolve_engine(engine: str, launch: Launch) -> str:
    """``auto``: world size 1 -> local, an MPI launcher -> mpi, otherwise gloo."""
    if engine != "auto":
        return engine
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


def _startup_fault(launch: Launch) -> None:
    """``HPC_ASGD_FAULT=startstop@RANK:0``: that rank stops (SIGSTOP) before the engine's
    start-up exchange, as a rank that hangs while starting does; its peers' deadline fires."""
    f = launch.fault
    if f is not None and f.kind == "startstop" and f.rank == launch.rank:
        os.kill(os.getpid(), signal.SIGSTOP)


__all__ = ["ENGINES", "Comm", "LocalComm", "Work", "make_comm", "resolve_engine"]
