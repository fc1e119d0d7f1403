"""``--algo local-async``: non-blocking in-place averaging that overlaps the workers' updates
("Local SGD meets asynchrony", ICLR 2021 submission; Kungurtsev, Bapi et al., "Scaling the
Wild", arXiv 2203.06638; reference code bapi/LPP-SGD).

The rank's main process is the averager while its W workers keep training (the CLI always runs
it with spawned workers; in a loop of your own, ``hpc_asgd.LocalAsync(model, opt, comm,
period=K)``, the loop's process is the averager too, through the hook on its optimizer's step,
and the rounds overlap the loop's next steps). The ranks agree on WHEN to average with a tiny
non-blocking MAX-allreduce of ``[node steps, still training]``: when the largest node step count
crosses the next multiple of K (``period``, node-level steps; K = 1 for the first ``warmup_steps``),
every rank, having seen the same maximum, snapshots ``x_s``, allreduces it while the workers
keep updating, then applies ``x += mean(x_s) - x_s`` in place (no concurrent update is lost).
Agreement rounds run on a communicator of their own; when one shows that no rank is still
training, the averagers stop together, and the final exact average gives consensus. With
``--keep-training`` a rank that has finished keeps training (its step count, still reported,
may trigger more rounds) until that agreement.

Pacing (the averager shares the node's cores with the workers, and here each wake-up of it
and each test of a collective costs tens of microseconds): an agreement is only useful about
when the fastest rank crosses the next multiple of K. Each agreement also carries every rank's
seconds per node step (MAX of its negative: the fastest rank's), so every rank computes the
same time for the next one, when the fastest rank should have crossed by half a step (between
``_AGREE_EVERY`` and ``_AGREE_MAX``; ``_AGREE_START`` apart until every rank has measured its
step time): a rank that has finished posts at once. About one or two agreements per K node
steps instead of up to 2,000 a second, and :meth:`nap_s` lets the main process sleep until
the next one; collectives in flight are tested a few times in a row at each look, with a
backoff of 2 to 8 ms between looks.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from hpc_asgd.comm import Comm, Work
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.periodic import Periodic
from hpc_asgd.sync.rounds import AsyncRound

_AGREE_EVERY = 5e-4  # s: at most ~2,000 agreement rounds a second, to leave the cores to workers
_AGREE_MAX = 0.1  # s: at least 10 a second (a stale step time)
_BURST = 4  # tests of a collective in flight at each look
_AGREE_START = 1e-2  # s: between agreements until the step time is known


def _tests(work, n: int = _BURST) -> bool:
    """Up to ``n`` tests in a row: a collective progresses one step of its schedule per test
    (the peers' next message may follow at once), and one wake-up of this process costs
    more than several tests."""
    return any(work.test() for _ in range(n))


@SYNCHRONIZERS.register("local-async")
class LocalAsync(Periodic):
    overlaps = True
    needs_workers = True
    keep_training = "local-async"

    def __init__(
        self,
        model: nn.Module | FlatModel,
        optimizer: torch.optim.Optimizer | None = None,
        comm: Comm | None = None,
        **kw: Any,
    ):
        super().__init__(model, optimizer, comm, **kw)
        # agreement and model rounds: never mixed with the evaluation's collectives
        own = self.comm.split(0, self.comm.rank)
        self.round = AsyncRound(own, self.flat, self.rule, self.budget, self.outer, self.payload)
        self.agree_comm = own
        # [node steps, still training, -seconds per node step]: MAX gives the largest step
        # count, whether any rank trains, and the fastest rank's step time
        self.agree_buf = torch.zeros(3, dtype=torch.float64)
        self.agree: Work | None = None
        self.agree_posted = 0.0
        self.agree_due = 0.0  # perf_counter() time to post the next agreement
        self.seen: tuple[int, float] | None = None  # (this rank's node step, when) at a change
        self.step_s = 0.0  # this rank's seconds per node step (0: not known yet)
        self.moved = False  # the node step has moved since the first look
        self.next = self.period_at(0)
        self.over = False

    def poll(self, step: int, finished: bool = False) -> None:
        """One non-blocking look: complete what finished, post what is due."""
        if self.over:
            return
        r = self.round
        self._track(step)
        if r.busy:
            if _tests(r):
                r.apply()
                self.rounds += 1
            else:
                r.overdue()
            return
        if self.agree is None:
            if time.perf_counter() < self.agree_due and not finished:
                return
            buf = self.agree_buf
            buf[0], buf[1], buf[2] = float(step), float(not finished), -self.step_s
            self.agree = self.agree_comm.iallreduce_(buf, op="max")
            self.agree_posted = time.perf_counter()
            return
        if not _tests(self.agree):
            return
        self.agree = None
        top, anyone_training = int(self.agree_buf[0]), bool(self.agree_buf[1])
        if not anyone_training:  # a round due now would only precede the final exact average
            self.over = True  # (and ranks that keep training would keep making rounds due)
            return
        if top >= self.next:  # every rank saw the same maximum: all average now
            while self.next <= top:
                self.next += self.period_at(self.next)
            r.start(finished=False, step=step)
        # The next agreement when the fastest rank should have crossed the next multiple of
        # K, by half a step: the same time on every rank (the same maximum, the same fastest
        # step time), so that they post about together.
        fastest = -float(self.agree_buf[2])  # 0 while a rank has no estimate yet
        wait = (self.next - top + 0.5) * fastest if fastest > 0 else _AGREE_START
        self.agree_due = time.perf_counter() + min(_AGREE_MAX, max(_AGREE_EVERY, wait))

    def _track(self, step: int) -> None:
        """This rank's seconds per node step (a moving average over the changes seen)."""
        now = time.perf_counter()
        if self.seen is None or step < self.seen[0]:
            self.seen = (step, now)
        elif step > self.seen[0]:
            # The first move is not measured: the first steps include start-up (~0.2 s here).
            if self.moved:
                per = (now - self.seen[1]) / (step - self.seen[0])
                self.step_s = 0.5 * (self.step_s or per) + 0.5 * per
            self.seen, self.moved = (step, now), True

    def nap_s(self) -> float:
        if self.over:
            return float("inf")
        now = time.perf_counter()
        # Each test of a collective in flight costs this process tens of us (MPI progress,
        # system calls) and each wake-up as much again: back off (a round or an agreement
        # late by a few ms costs nothing but that).
        if self.round.busy:
            return min(8e-3, max(2e-3, now - self.round.posted_at))
        if self.agree is not None:  # the peers post about now
            return min(8e-3, max(2e-3, now - self.agree_posted))
        return max(0.0, self.agree_due - now)

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
        self.poll(step, finished=True)
        # Past a deadline (counted from the posting), the engine's error names the missing ranks.
        waited = time.perf_counter() - self.agree_posted
        if self.round.busy:
            self.round.overdue()
        elif self.agree is not None and waited > self.agree_comm.timeout:
            self.agree.wait(waited=waited)
        return self.over

    def quiesce(self, step: int | None = None) -> None:
        step = self.clock.step if step is None else step
        self.drain(step)
        self.over = False
        while self.next <= step:
            self.next += self.period_at(self.next)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next = int(state.get("next", self.next))

    @property
    def inflight_s(self) -> float:
        return self.round.inflight_s
