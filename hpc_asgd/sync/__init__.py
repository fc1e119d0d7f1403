"""Synchronisers across ranks, one file each, registered under their ``--algo`` name
(``hpc_asgd.registry.SYNCHRONIZERS``); importing this package registers the built-in ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.base import Averaging, Periodic, Synchronizer
from hpc_asgd.sync.hier_avg import HierAvg
from hpc_asgd.sync.lasgd import LASGD
from hpc_asgd.sync.local_async import LocalAsync
from hpc_asgd.sync.local_sgd import LocalSGD
from hpc_asgd.sync.none import NoSync
from hpc_asgd.sync.synchronous import SyncSGD

if TYPE_CHECKING:
    from hpc_asgd.config import Config


def make_synchronizer(
    cfg: Config, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
) -> Synchronizer:
    """The configured synchroniser; collective (it may split communicators)."""
    return SYNCHRONIZERS.get(cfg.sync.algo).from_config(cfg, comm, flat, rule, steps_per_epoch)


__all__ = [
    "LASGD",
    "Averaging",
    "HierAvg",
    "LocalAsync",
    "LocalSGD",
    "NoSync",
    "Periodic",
    "SyncSGD",
    "Synchronizer",
    "make_synchronizer",
]
