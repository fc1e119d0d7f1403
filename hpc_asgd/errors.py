"""Errors that end a run with one readable line (see ``cli.main``)."""

from __future__ import annotations


class HpcAsgdError(Exception):
    """Base class: the message is printed as is, without a traceback."""


class ConfigError(HpcAsgdError, ValueError):
    """A configuration field or an argument is wrong; raised on every rank before any
    collective (a ValueError too, for callers of the Python API)."""


class DataError(HpcAsgdError):
    """A data file is missing, corrupt or of the wrong shape; the message names the file."""


class OutputError(HpcAsgdError):
    """The outputs could not be written where asked; the message says where they went."""


class WriteError(HpcAsgdError, OSError):
    """A file could not be written (a full or failing disk, a folder gone): whatever the
    writer raised (torch's zip writer says ``unexpected pos`` on a full disk), with the path and
    the free space; the previous file, if any, is left in place."""


class CommError(HpcAsgdError):
    """A collective failed or passed its deadline; the message names the missing ranks."""


class PeerLost(CommError):
    """An engine that survives failures (MPI with ULFM) reported a peer's process as dead, or
    a communicator revoked by a survivor that saw one: the survivors may shrink and go on
    (``--min-ranks``); otherwise it ends the job like any CommError."""


class TooFewRanks(CommError):
    """Fewer ranks than ``--min-ranks`` survived a loss. Every survivor raises it at the same
    point (they agreed on the membership), so each ends on its own, without MPI_Abort: the
    survivors aborting at once under ULFM could leave mpirun waiting."""


def error_line(rank: int, size: int, err: BaseException, host: str | None = None) -> str:
    """The one line a failing rank prints; it names the host too, since nodes fail."""
    what = str(err) if isinstance(err, HpcAsgdError) else f"{type(err).__name__}: {err}"
    where = f" ({host})" if host else ""
    return f"hpc-asgd: error on rank {rank}/{size}{where}: {what}"


class Preempted(HpcAsgdError):
    """Every rank wrote the checkpoint and stops so that the job can be requeued."""

    EXIT_CODE = 85  # the SLURM templates requeue the job on this exit status

    def __init__(self, step: int, saved: bool = True):
        what = (
            f"checkpointed at node step {step}"
            if saved
            else f"USR1 before the first step: nothing new to checkpoint (node step {step})"
        )
        super().__init__(f"{what}; exiting with {self.EXIT_CODE} to be requeued")
        self.step = step
