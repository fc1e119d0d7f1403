"""hpc_asgd: asynchronous, local and hierarchical data-parallel SGD on HPC clusters.

The Python API, for your own model, optimizer and training loop (under mpirun, srun,
torchrun, or alone)::

    import hpc_asgd

    comm = hpc_asgd.init()                        # the job's ranks; one engine, started once
    model = MyNet()                               # any nn.Module (float32 parameters)
    opt = torch.optim.AdamW(model.parameters())   # any optimizer, its state private per rank
    sampler = hpc_asgd.ShardSampler.of(train_set, comm, batch_size=32)
    loader = DataLoader(train_set, batch_sampler=sampler)
    with hpc_asgd.LASGD(model, opt, comm, period=8, steps=2000) as avg:
        for x, y in avg.iterate(loader):          # until the job's budget is spent
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()                            # the hook makes the rounds' calls
    # leaving the block: the final exact average; every rank holds the same bits

The synchronisers (each also an ``--algo`` of the CLI, built there from the configuration):
:class:`SyncSGD`, :class:`LocalSGD`, :class:`LocalAsync`, :class:`LASGD`, :class:`HierAvg`,
:class:`NoSync`. :class:`Comm` is the communicator seam, for collectives of your own.
Imports are lazy: ``import hpc_asgd`` itself loads neither torch nor an engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "init": "hpc_asgd.comm",
    "Comm": "hpc_asgd.comm",
    "Work": "hpc_asgd.comm",
    "FlatModel": "hpc_asgd.flat",
    "ShardSampler": "hpc_asgd.shard",
    "Averaging": "hpc_asgd.sync",
    "SyncSGD": "hpc_asgd.sync",
    "LocalSGD": "hpc_asgd.sync",
    "LocalAsync": "hpc_asgd.sync",
    "LASGD": "hpc_asgd.sync",
    "HierAvg": "hpc_asgd.sync",
    "NoSync": "hpc_asgd.sync",
    "ConfigError": "hpc_asgd.errors",
    "CommError": "hpc_asgd.errors",
    "HpcAsgdError": "hpc_asgd.errors",
}

__all__ = [
    "LASGD",
    "Averaging",
    "Comm",
    "CommError",
    "ConfigError",
    "FlatModel",
    "HierAvg",
    "HpcAsgdError",
    "LocalAsync",
    "LocalSGD",
    "NoSync",
    "ShardSampler",
    "SyncSGD",
    "Work",
    "init",
]

if TYPE_CHECKING:
    from hpc_asgd.comm import Comm, Work, init
    from hpc_asgd.errors import CommError, ConfigError, HpcAsgdError
    from hpc_asgd.flat import FlatModel
    from hpc_asgd.shard import ShardSampler
    from hpc_asgd.sync import LASGD, Averaging, HierAvg, LocalAsync, LocalSGD, NoSync, SyncSGD


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpc_asgd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
