"""``--algo lasgd``: asynchronous allreduce of the model (LASGD; Avidor et al., arXiv 2203.13085).

Local steps never wait for communication. Every ``period`` K local steps, if no round is in
flight, the rank snapshots its model and starts a non-blocking allreduce of the snapshot; the
steps go on, and when the allreduce completes the delta ``mean(x_s) - x_s`` is added to the
model that moved on (``rounds.AsyncRound``). At most one round is in flight, so a fast rank's
next round waits (in the background) for the slow ranks to join the current one. Rounds are
matched by order on a communicator of their own; after its last step a rank keeps joining
rounds until every rank has finished (with ``--keep-training`` it keeps training meanwhile),
then the final exact average gives consensus. K = 1 for the first ``warmup_steps``.

In a loop of your own, ``hpc_asgd.LASGD(model, opt, comm, period=K)``: the hook on the
optimizer's step posts and completes the rounds (progress is driven from it, once a step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.periodic import Periodic
from hpc_asgd.sync.rounds import AsyncRound, settle_all


@SYNCHRONIZERS.register("lasgd")
class LASGD(Periodic):
    overlaps = True
    keep_training = "lasgd"

    def __init__(
        self,
        model: nn.Module | FlatModel,
        optimizer: torch.optim.Optimizer | None = None,
        comm: Comm | None = None,
        **kw: Any,
    ):
        super().__init__(model, optimizer, comm, **kw)
        own = self.comm.split(0, self.comm.rank)  # its rounds never mix with other collectives
        self.round = AsyncRound(own, self.flat, self.rule, self.budget, self.outer, self.payload)
        self.next = 0  # node step at or after which the next round may start

    def poll(self, step: int) -> None:
        r = self.round
        if r.busy and r.test():
            r.apply()
            self.rounds += 1
        elif r.busy:
            r.overdue()  # a peer silent past --comm-timeout: its error, not training forever
        if not r.busy and step >= self.next and step > 0:
            r.start(finished=False, step=step)
            self.next = step + self.period_at(step)

    def drain(self, step: int) -> None:
        self.wait_s += self.round.drain(step)
        self.rounds = self.round.rounds

    def settle(self, step: int) -> bool:
        over = settle_all([self.round], step)
        self.rounds = self.round.rounds
        return over

    def quiesce(self, step: int | None = None) -> None:
        step = self.clock.step if step is None else step
        self.drain(step)
        # the schedule goes on as it would have: K = 1 still during the post-local warm-up
        self.next = step + self.period_at(step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next = int(state.get("next", self.next))

    @property
    def inflight_s(self) -> float:
        return self.round.inflight_s
