"""``--algo sync``: synchronous data-parallel SGD, the DDP / Horovod baseline.

Every step, the gradients of all ranks are averaged by one allreduce of the flat gradient
buffer ``(n_params,)`` before the update, so every rank applies the same step. Needs the
rank's step in its own process (W = 1): gradients of spawned workers never reach MPI. In a
loop of your own, ``hpc_asgd.SyncSGD(model, opt, comm)`` averages them in a pre-hook of the
optimizer's step (or call ``reduce_gradients()`` between backward and the step yourself).
"""

from __future__ import annotations

from typing import Any

from hpc_asgd.errors import ConfigError
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.base import Averaging


@SYNCHRONIZERS.register("sync")
class SyncSGD(Averaging):
    averages_gradients = True

    @classmethod
    def validate(cls, cfg: Any, world_size: int, local_size: int) -> None:
        w = cfg.workers
        if w.workers > 1 or w.spawn_workers:
            raise ConfigError(
                "algo: 'sync' averages gradients inside every step and runs with W = 1 in the "
                "rank's own process; with workers use local-sgd (--period 1 averages every step)"
            )

    def grads_ready(self, step: int) -> None:
        self.average_(self.flat.grad)
        self.rounds += 1
        self.last_round = step
