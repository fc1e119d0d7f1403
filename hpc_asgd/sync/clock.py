"""The rounds' clock: one synchroniser's schedule in node steps, the same on every rank.

A synchroniser names the node step of its next blocking round (``next_stop``); its ranks must
meet there in the same order, so the clock keeps that step and makes the calls each node step
owes: the blocking round when it is due (``step_done``), then one non-blocking look at the
rounds in flight (``poll``). Every driver of a synchroniser goes through it: the CLI's loop in
the rank's own process (``tick`` after each step), the CLI's loop with worker processes
(``round`` at event steps, the main process polling meanwhile), and the Python API's hook on the
user's optimizer (``tick``).

It also holds the Python API's budget (``steps``, ``time_budget_s``), set up at the first step:
with a non-blocking synchroniser and several ranks, ``steps`` is each rank's share of the job's
budget (``rounds.Budget``: a fast rank trains on while a straggler finishes); otherwise every
rank takes exactly ``steps``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpc_asgd.sync.protocol import Synchronizer

_UNSET = -1  # no schedule computed yet (the synchroniser may still be under construction)


class Clock:
    def __init__(self, sync: Synchronizer, steps: int = 0, time_budget_s: float = 0.0):
        self.sync = sync
        self.step = 0  # node steps taken (by ``tick``), or the step resumed from
        self._stop: int | None = _UNSET
        self.steps, self.time_budget_s = steps, time_budget_s
        self.limit = 0  # every rank's own step count (blocking synchronisers): 0 = none
        self.begun = False

    @property
    def stop(self) -> int | None:
        """The node step of the next blocking round; None: there is none to come."""
        if self._stop == _UNSET:
            self.resume(self.step)
        return self._stop

    def resume(self, start: int) -> None:
        """Go on from node step ``start`` (a resumed run): replay the schedule up to it."""
        stop = self.sync.next_stop(0)
        while stop is not None and stop <= start:
            stop = self.sync.next_stop(stop)
        self._stop, self.step = stop, start

    def round(self, step: int) -> None:
        """The blocking round due at node step ``step``, if one is."""
        if step == self.stop:
            self.sync.step_done(step)
            self._stop = self.sync.next_stop(step)

    def poll(self, step: int) -> None:
        """One look at the non-blocking rounds, from the process that steps: their own cost
        (snapshot, progress, delta) stalls its steps, so it counts as waiting."""
        if self.sync.overlaps:
            t0 = time.perf_counter()
            self.sync.poll(step)
            self.sync.wait_s += time.perf_counter() - t0

    def tick(self) -> None:
        """One node step was taken (in the process that polls): its round, then a look."""
        if not self.begun:
            self.begin()
        if self._stop == _UNSET:  # the schedule from the steps taken before this one
            self.resume(self.step)
        self.step += 1
        self.round(self.step)
        self.poll(self.step)

    # ---- the Python API's budget ---------------------------------------------------------
    def begin(self) -> None:
        """At the first step: the budget counts from here."""
        sync, b = self.sync, self.sync.budget
        size = sync.comm.size
        if self.steps and sync.overlaps and size > 1:
            b.steps, b.world = self.steps * size, size  # the job's: summed over the ranks
        elif self.steps:
            self.limit = self.steps
        b.begin(self.step, self.time_budget_s / 60, 0.0)
        self.begun = True

    def should_stop(self) -> bool:
        """Whether this rank takes no more steps: its budget is spent (and stays spent)."""
        if not self.begun:
            self.begin()
        if self.limit and self.step >= self.limit:
            return True
        return self.sync.budget.spent(self.step)
