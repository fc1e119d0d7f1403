"""``--algo local-async``: non-blocking in-place averaging that overlaps the workers' updates
("Local SGD meets asynchrony", ICLR 2021 submission; Kungurtsev, Bapi et al., "Scaling the
Wild", arXiv 2203.06638; reference code bapi/LPP-SGD).

The rank's main process is the averager while its W workers keep training (it always runs
with spawned workers). The ranks agree on WHEN to average with a tiny non-blocking
MAX-allreduce of ``[node steps, still training]``: when the largest node step count crosses
the next multiple of K (``--period``, node-level steps; K = 1 before ``--post-local-epochs``),
every rank, having seen the same maximum, snapshots ``x_s``, allreduces it while the workers
keep updating, then applies ``x += mean(x_s) - x_s`` in place (no concurrent update is lost).
Agreement rounds run back to back on a communicator of their own; when one shows that no rank
is still training, the averagers stop together, and the final exact average gives consensus.
With ``--keep-training`` a rank that has finished keeps training (its step count, still
reported, may trigger more rounds) until that agreement.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from hpc_asgd.comm import Comm, Work
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.base import Periodic
from hpc_asgd.sync.rounds import AsyncRound

if TYPE_CHECKING:
    from hpc_asgd.config import Config

_AGREE_EVERY = 5e-4  # s: at most ~2,000 agreement rounds a second, to leave the cores to workers


@SYNCHRONIZERS.register("local-async")
class LocalAsync(Periodic):
    overlaps = True
    needs_workers = True
    keep_training = "local-async"

    def __init__(
        self,
        comm: Comm,
        flat: FlatModel,
        rule: UpdateRule,
        period: int,
        post_local_epochs: float,
        steps_per_epoch: int,
    ):
        super().__init__(comm, flat, rule, period, post_local_epochs)
        self.spe = steps_per_epoch
        own = comm.split(0, comm.rank)  # agreement and model rounds: never mixed with evaluation
        self.round = AsyncRound(own, flat, rule, self.budget)
        self.agree_comm = own
        self.agree_buf = torch.zeros(2, dtype=torch.float64)  # [node steps, still training]
        self.agree: Work | None = None
        self.agree_posted = 0.0
        self.next = self._k(0)
        self.over = False

    @classmethod
    def from_config(
        cls, cfg: Config, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> LocalAsync:
        s = cfg.sync
        return cls(comm, flat, rule, s.period, s.post_local_epochs, steps_per_epoch)

    def _k(self, step: int) -> int:
        return self.period_at(step / self.spe)

    def poll(self, step: int, epoch: float, finished: bool = False) -> None:
        """One non-blocking look: complete what finished, post what is due."""
        if self.over:
            return
        r = self.round
        if r.busy:
            if r.test():
                r.apply()
                self.rounds += 1
            else:
                r.overdue()
            return
        if self.agree is None:
            if time.perf_counter() - self.agree_posted < _AGREE_EVERY and not finished:
                return
            self.agree_buf[0], self.agree_buf[1] = float(step), float(not finished)
            self.agree = self.agree_comm.iallreduce_(self.agree_buf, op="max")
            self.agree_posted = time.perf_counter()
            return
        if not self.agree.test():
            return
        self.agree = None
        top, anyone_training = int(self.agree_buf[0]), bool(self.agree_buf[1])
        if not anyone_training:  # a round due now would only precede the final exact average
            self.over = True  # (and ranks that keep training would keep making rounds due)
        elif top >= self.next:  # every rank saw the same maximum: all average now
            while self.next <= top:
                self.next += self._k(self.next)
            r.start(finished=False, step=step)

    def drain(self, step: int) -> None:
        """This rank has finished: keep agreeing (and averaging) until every rank has."""
        t0 = time.perf_counter()
        while not self.settle(step):
            if self.round.busy:
                self.round.wait()
            elif self.agree is not None:
                self.agree.wait()
        self.wait_s += time.perf_counter() - t0

    def settle(self, step: int) -> bool:
        self.poll(step, 0.0, finished=True)
        # Past a deadline (counted from the posting), the engine's error names the missing ranks.
        waited = time.perf_counter() - self.agree_posted
        if self.round.busy:
            self.round.overdue()
        elif self.agree is not None and waited > self.agree_comm.timeout:
            self.agree.wait(waited=waited)
        return self.over

    def quiesce(self, step: int) -> None:
        self.drain(step)
        self.over = False
        while self.next <= step:
            self.next += self._k(self.next)

    @property
    def inflight_s(self) -> float:
        return self.round.inflight_s
