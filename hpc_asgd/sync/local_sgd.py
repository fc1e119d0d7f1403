"""``--algo local-sgd``: K-AVG / local SGD (Zhou & Cong, IJCAI 2018; Lin et al., ICLR 2020).

Each rank takes K local (node-level) steps, then the ranks average their models (parameters
and float buffers, one blocking allreduce of the flat buffer; with W workers they are paused
at the round). Post-local SGD: K = 1 while the epoch is below ``post_local_epochs``. Momentum
buffers stay local.
"""

from __future__ import annotations

from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.base import Periodic


@SYNCHRONIZERS.register("local-sgd")
class LocalSGD(Periodic):
    def next_stop(self, step: int, epoch: float) -> int:
        return step + self.period_at(epoch)

    def step_done(self, step: int, epoch: float) -> None:
        self.average_model_()
        self.rounds += 1
