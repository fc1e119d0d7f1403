"""Update rules for W workers sharing one model inside a rank, one file each."""

from __future__ import annotations

import torch

from hpc_asgd.config import Config
from hpc_asgd.shm.base import HIST_BINS, Applied, AtomicArray, UpdateRule
from hpc_asgd.shm.hogwild import Hogwild
from hpc_asgd.shm.leashed import Leashed
from hpc_asgd.shm.locked import Locked
from hpc_asgd.shm.partitioned import Partitioned


def make_rule(cfg: Config, params: torch.Tensor, ctx) -> UpdateRule:
    """The configured rule over ``params`` (the shared flat buffer's parameter part)."""
    w = cfg.workers
    if w.update == "hogwild":
        return Hogwild(params, w.max_staleness)
    if w.update == "locked":
        return Locked(params, ctx, w.max_staleness)
    if w.update == "leashed":
        return Leashed(params, w.workers, w.persistence)
    if w.update == "partitioned":
        return Partitioned(params, w.workers, w.partition_after_epochs)
    raise AssertionError(f"validated update {w.update!r} has no rule")


__all__ = [
    "HIST_BINS",
    "Applied",
    "AtomicArray",
    "Hogwild",
    "Leashed",
    "Locked",
    "Partitioned",
    "UpdateRule",
    "make_rule",
]
