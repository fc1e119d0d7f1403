"""``--algo hier-avg``: hierarchical averaging (Zhou & Cong, arXiv 1903.05133).

Ranks form groups of S consecutive ranks (``--group-size``; default: the ranks of one node),
i.e. groups ``[0..S-1], [S..2S-1], ...``. Every K1 local steps each group averages its models
on its sub-communicator; every K1*K2 steps all ranks average instead. S = 1 is K-AVG with
K = K1*K2; K1 = K2 = 1 is synchronous averaging every step. Blocking, as in the paper.
"""

from __future__ import annotations

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.shm.base import UpdateRule
from hpc_asgd.sync.base import Averaging


def make_group(comm: Comm, group_size: int) -> Comm:
    """The averaging group of this rank: consecutive ranks, or the node when S = 0."""
    if group_size:
        return comm.split(comm.rank // group_size, comm.rank)
    return comm.split_node()


class HierAvg(Averaging):
    def __init__(self, comm: Comm, flat: FlatModel, rule: UpdateRule, group: Comm,
                 local_period: int, global_period: int):  # fmt: skip
        super().__init__(comm, flat, rule)
        self.group, self.k1, self.k2 = group, local_period, global_period
        self.group_rounds = 0

    def next_stop(self, step: int, epoch: float) -> int:
        return step + self.k1

    def step_done(self, step: int, epoch: float) -> None:
        if step % (self.k1 * self.k2) == 0:
            self.average_model_()
            self.rounds += 1
        else:
            self.average_model_(self.group)
            self.group_rounds += 1
