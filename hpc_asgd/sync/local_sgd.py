"""``--algo local-sgd``: K-AVG / local SGD (Zhou & Cong, IJCAI 2018; Lin et al., ICLR 2020).

Each rank takes K local steps, then the ranks average their models (parameters and float
buffers, one blocking allreduce of the flat buffer). Post-local SGD: K = 1 for the first
``post_local_epochs`` epochs. Momentum buffers stay local.
"""

from __future__ import annotations

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.sync.base import Averaging


class LocalSGD(Averaging):
    def __init__(self, comm: Comm, flat: FlatModel, period: int, post_local_epochs: float = 0.0):
        super().__init__(comm, flat)
        self.period, self.post_local_epochs = period, post_local_epochs
        self.last = 0  # step of the last average

    def step_done(self, step: int, epoch: float) -> None:
        k = 1 if epoch < self.post_local_epochs else self.period
        if step - self.last >= k:
            self.average_(self.flat.data)
            self.rounds += 1
            self.last = step
