"""Synchronisers across ranks, one file each; ``make_synchronizer`` picks one from the config."""

from __future__ import annotations

from hpc_asgd.comm import Comm
from hpc_asgd.config import Config
from hpc_asgd.flat import FlatModel
from hpc_asgd.shm.base import UpdateRule
from hpc_asgd.sync.base import Synchronizer
from hpc_asgd.sync.hier_avg import HierAvg, make_group
from hpc_asgd.sync.lasgd import LASGD
from hpc_asgd.sync.local_async import LocalAsync
from hpc_asgd.sync.local_sgd import LocalSGD
from hpc_asgd.sync.none import NoSync
from hpc_asgd.sync.synchronous import SyncSGD


def make_synchronizer(
    cfg: Config, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
) -> Synchronizer:
    """The configured synchroniser; collective (it may split communicators)."""
    s = cfg.sync
    if s.algo == "none":
        return NoSync(comm, flat, rule)
    if s.algo == "sync":
        return SyncSGD(comm, flat, rule)
    if s.algo == "local-sgd":
        return LocalSGD(comm, flat, rule, s.period, s.post_local_epochs)
    if s.algo == "hier-avg":
        group = make_group(comm, s.group_size)
        nonblocking = s.hier_mode == "nonblocking"
        return HierAvg(comm, flat, rule, group, s.local_period, s.global_period, nonblocking)
    if s.algo == "lasgd":
        return LASGD(comm, flat, rule, s.period, s.post_local_epochs)
    if s.algo == "local-async":
        return LocalAsync(comm, flat, rule, s.period, s.post_local_epochs, steps_per_epoch)
    raise AssertionError(f"validated algo {s.algo!r} has no synchroniser")


__all__ = [
    "LASGD",
    "HierAvg",
    "LocalAsync",
    "LocalSGD",
    "NoSync",
    "SyncSGD",
    "Synchronizer",
    "make_synchronizer",
]
