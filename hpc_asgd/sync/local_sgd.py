"""``--algo local-sgd``: K-AVG / local SGD (Zhou & Cong, IJCAI 2018; Lin et al., ICLR 2020).

Each rank takes K local (node-level) steps, then the ranks average their models (parameters
and float buffers, one blocking allreduce of the flat buffer; with W workers they are paused
at the round). Post-local SGD: K = 1 while the epoch is below ``post_local_epochs``. Momentum
buffers stay local.
"""

from __future__ import annotations

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.shm.base import UpdateRule
from hpc_asgd.sync.base import Averaging


class LocalSGD(Averaging):
    def __init__(
        self,
        comm: Comm,
        flat: FlatModel,
        rule: UpdateRule,
        period: int,
        post_local_epochs: float = 0.0,
    ):
        super().__init__(comm, flat, rule)
        self.period, self.post_local_epochs = period, post_local_epochs

    def next_stop(self, step: int, epoch: float) -> int:
        return step + (1 if epoch < self.post_local_epochs else self.period)

    def step_done(self, step: int, epoch: float) -> None:
        self.average_model_()
        self.rounds += 1
