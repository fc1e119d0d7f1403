"""Synchronisers across ranks, one file each, registered under their ``--algo`` name
(``hpc_asgd.registry.SYNCHRONIZERS``); importing this package registers the built-in ones.
Each class is also the Python API's object for a training loop of your own."""

from __future__ import annotations

from typing import Any

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.base import Averaging
from hpc_asgd.sync.clock import Clock
from hpc_asgd.sync.hier_avg import HierAvg
from hpc_asgd.sync.lasgd import LASGD
from hpc_asgd.sync.local_async import LocalAsync
from hpc_asgd.sync.local_sgd import LocalSGD
from hpc_asgd.sync.none import NoSync
from hpc_asgd.sync.periodic import Periodic
from hpc_asgd.sync.protocol import Synchronizer, keep_training_refused
from hpc_asgd.sync.synchronous import SyncSGD


def make_synchronizer(
    cfg: Any, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
) -> Synchronizer:
    """The synchroniser ``cfg`` (the application's configuration) names; collective (it
    checks the model on every rank, takes rank 0's, and may split communicators)."""
    return SYNCHRONIZERS.get(cfg.sync.algo).from_config(cfg, comm, flat, rule, steps_per_epoch)


__all__ = [
    "LASGD",
    "Averaging",
    "Clock",
    "HierAvg",
    "LocalAsync",
    "LocalSGD",
    "NoSync",
    "Periodic",
    "SyncSGD",
    "Synchronizer",
    "keep_training_refused",
    "make_synchronizer",
]
