"""``--algo lasgd``: asynchronous allreduce of the model (LASGD; Avidor et al., arXiv 2203.13085).

Local steps never wait for communication. Every ``--period`` K local steps, if no round is in
flight, the rank snapshots its model and starts a non-blocking allreduce of the snapshot; the
steps go on, and when the allreduce completes the delta ``mean(x_s) - x_s`` is added to the
model that moved on (``rounds.AsyncRound``). At most one round is in flight, so a fast rank's
next round waits (in the background) for the slow ranks to join the current one. Rounds are
matched by order on a communicator of their own; after its last step a rank keeps joining
rounds until every rank has finished (with ``--keep-training`` it keeps training meanwhile),
then the final exact average gives consensus.
"""

from __future__ import annotations

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.base import Periodic
from hpc_asgd.sync.rounds import AsyncRound, settle_all


@SYNCHRONIZERS.register("lasgd")
class LASGD(Periodic):
    overlaps = True
    keep_training = "lasgd"

    def __init__(
        self,
        comm: Comm,
        flat: FlatModel,
        rule: UpdateRule,
        period: int,
        post_local_epochs: float = 0.0,
    ):
        super().__init__(comm, flat, rule, period, post_local_epochs)
        self.round = AsyncRound(comm.split(0, comm.rank), flat, rule, self.budget)
        self.next = 0  # node step at or after which the next round may start

    def poll(self, step: int, epoch: float) -> None:
        r = self.round
        if r.busy and r.test():
            r.apply()
            self.rounds += 1
        elif r.busy:
            r.overdue()  # a peer silent past --comm-timeout: its error, not training forever
        if not r.busy and step >= self.next and step > 0:
            r.start(finished=False, step=step)
            self.next = step + self.period_at(epoch)

    def drain(self, step: int) -> None:
        self.wait_s += self.round.drain(step)
        self.rounds = self.round.rounds

    def settle(self, step: int) -> bool:
        over = settle_all([self.round], step)
        self.rounds = self.round.rounds
        return over

    def quiesce(self, step: int) -> None:
        self.drain(step)
        self.next = step + self.period

    @property
    def inflight_s(self) -> float:
        return self.round.inflight_s
