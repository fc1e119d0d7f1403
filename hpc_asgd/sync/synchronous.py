"""``--algo sync``: synchronous data-parallel SGD, the DDP / Horovod baseline.

Every step, the gradients of all ranks are averaged by one allreduce of the flat gradient
buffer ``(n_params,)`` before the update, so every rank applies the same step. Needs the
rank's step in its own process (W = 1): gradients of spawned workers never reach MPI.
"""

from __future__ import annotations

from hpc_asgd.sync.base import Averaging


class SyncSGD(Averaging):
    averages_gradients = True

    def grads_ready(self, step: int) -> None:
        self.average_(self.flat.grad)
        self.rounds += 1
