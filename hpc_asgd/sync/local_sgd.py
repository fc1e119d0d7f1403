"""``--algo local-sgd``: K-AVG / local SGD (Zhou & Cong, IJCAI 2018; Lin et al., ICLR 2020).

Each rank takes K local (node-level) steps, then the ranks average their models (parameters
and float buffers, one blocking allreduce of the flat buffer; with W workers they are paused
at the round). Post-local SGD: K = 1 for the first ``warmup_steps``. Optimizer state (momentum,
Adam's moments) stays local. With an outer optimizer (``outer_lr``, ``outer_momentum``,
``outer_nesterov``: SlowMo / DiLoCo, ``hpc_asgd.sync.outer``) the round is its step on
``x_g - mean``, and every rank goes on from the new global model.

In a loop of your own: ``hpc_asgd.LocalSGD(model, opt, comm, period=K, warmup_steps=0)``, the
counterpart of torch's ``PostLocalSGDOptimizer(opt, PeriodicModelAverager(K, warmup_steps))``
(which averages the parameters only) and of torchft's ``LocalSGD(manager, model, opt,
sync_every=K)``.
"""

from __future__ import annotations

from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.periodic import Periodic


@SYNCHRONIZERS.register("local-sgd")
class LocalSGD(Periodic):
    def next_stop(self, step: int) -> int:
        return step + self.period_at(step)

    def step_done(self, step: int) -> None:
        self.global_round_()
        self.rounds += 1
        self.last_round = step
