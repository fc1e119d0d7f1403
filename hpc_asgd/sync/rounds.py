"""Non-blocking averaging rounds that overlap training, without losing concurrent updates.

A round snapshots the model ``x_s`` (parameters through the update rule, which may keep its own
versions, and the float buffers), allreduces the snapshot in the background while training
goes on, and on completion adds ``mean(x_s) - x_s`` to the model that moved on:

    x  <-  x + (mean(x_s) - x_s)          (every update made meanwhile is kept)

With an outer optimizer (``hpc_asgd.sync.outer``), the round's mean is its step's input: the
pseudo-gradient is ``x_g - mean(x_s)``, with ``x_g`` this rank's global model after the
previous completed round; the step moves ``x_g`` (and the momentum, once per completed round)
to ``x_g'``, and the rank adds ``x_g' - x_s`` to the model that moved on, so the steps taken
while the round was in flight are kept on top of the new global model. Buffers: the plain
correction above.

The round's buffer carries two extra elements: this rank's "finished training" flag, so the
ranks can end a stream of order-matched rounds together (when a round's flags sum to the world
size, every rank has seen the same thing in the same round and stops after it), and, for the
job's budget (:class:`Budget`), its node step count.
"""

from __future__ import annotations

import time

import torch

from hpc_asgd.comm import Comm, Work
from hpc_asgd.comm.base import Poller
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.outer import OuterSGD
from hpc_asgd.sync.payload import Payload


class Budget:
    """When this rank stops training (``--budget``, ``--time-budget``).

    ``--budget job`` (the default; non-blocking synchronisers, more than one rank): the job's
    budget is ``steps`` node steps summed over the ranks (``--epochs`` passes over the whole
    training set), not a fixed count per rank, so a fast rank never idles while a slow one
    finishes. Each round of the world stream carries, besides the snapshot, this rank's node
    step count when it posted the round; a completed round's sum ``seen`` plus the steps this
    rank took since it posted (``step - at_post``) is a lower bound of the job's progress, and
    a rank stops once that reaches the budget (:meth:`spent`). The ranks need not agree on the
    moment: one that stopped only drains the rounds (flagged finished) until every rank has,
    and learns of the others' steps meanwhile. So the job ends past its budget only by the
    steps the other ranks took since they posted the round a rank last saw
    (``summary.json`` ``budget_used``), and never short of it.

    The same sums give each rank the job's progress for its learning-rate schedule: at the last
    round the ranks had taken ``seen / world`` node steps on average, this rank ``at_post``, so
    the job is about ``step + offset`` node steps in, ``offset = seen / world - at_post``
    (``offset``: one float64, shared with the workers).

    ``--time-budget``: each rank's own clock, from its first step (less a resumed run's time).
    """

    def __init__(self) -> None:
        self.steps = 0  # node steps summed over the ranks; 0: each rank takes its own steps
        self.world = 1
        self.deadline: float | None = None  # time.monotonic() at which the time budget is spent
        self.seen, self.at_post = 0.0, 0  # the last round's sum of steps; ours when posted
        self.exhausted = False
        self.ended_by: str | None = None  # "steps" | "time"
        self.offset = torch.zeros(1, dtype=torch.float64)  # job progress - own node step
        # node steps of ranks that were lost (--min-ranks) that still count for the job: the
        # rounds' sums, over the survivors, leave them out
        self.credit = 0.0

    def begin(self, step: int, minutes: float, train_before: float) -> None:
        """At this rank's first step ``step`` (all ranks start, or resume, at the same one)."""
        self.seen, self.at_post = float(self.world * step), step
        if minutes:
            self.deadline = time.monotonic() + 60 * minutes - train_before

    def timeup(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def spent(self, step: int) -> bool:
        """Whether this rank, at node step ``step``, stops training (and stays stopped)."""
        if not self.exhausted:
            if self.steps and self.seen + step - self.at_post >= self.steps:
                self.exhausted, self.ended_by = True, "steps"
            elif self.timeup():
                self.exhausted, self.ended_by = True, "time"
        return self.exhausted

    def record(self, steps: float, at_post: int) -> None:
        """A round of the world stream completed: its sum of the ranks' node steps."""
        self.seen, self.at_post = steps + self.credit, at_post
        if self.steps:
            self.offset[0] = self.seen / self.world - at_post


TAIL = 2  # [finished, node steps] after the snapshot


class AsyncRound:
    """At most one round in flight on ``comm`` (a communicator of its own: its collectives
    never interleave with the evaluation's). ``budget``: the job's, for the world stream."""

    def __init__(
        self,
        comm: Comm,
        flat: FlatModel,
        rule: UpdateRule,
        budget: Budget | None = None,
        outer: OuterSGD | None = None,
        payload: Payload | None = None,
    ):
        self.comm, self.flat, self.rule, self.budget = comm, flat, rule, budget
        self.outer, self.payload = outer, payload  # a payload comes with an outer's x_g
        self.wire: Work | None = None  # the payload's allreduce, beside ``work``
        n = len(flat)
        # (n + 2,): [x_s (params, buffers), finished, node steps]
        self.buf = torch.zeros(n + TAIL, dtype=flat.data.dtype)
        self.snap = torch.zeros(n + TAIL, dtype=flat.data.dtype)
        self.at_post = 0  # this rank's node step when the round in flight was posted
        self.work: Work | None = None
        self.posted_at = 0.0
        self.rounds = 0
        self.inflight_s = 0.0  # wall time rounds spent in flight (training went on meanwhile)
        self.closed = False  # a round saw every rank finished: the stream has ended

    @property
    def busy(self) -> bool:
        return self.work is not None

    def start(self, finished: bool, step: int) -> None:
        """Snapshot the model and post the allreduce of the snapshot (at node step ``step``)."""
        p, b = self.flat.n_params, self.budget
        self.rule.snapshot(self.buf[:p])
        self.buf[p:-TAIL].copy_(self.flat.data[p:])
        # a rank past the job's budget only helps the others end the stream
        self.buf[-2] = float(finished or (b is not None and b.exhausted))
        self.buf[-1] = float(step)
        self.at_post = step
        self.snap.copy_(self.buf)
        self.posted_at = time.perf_counter()
        if self.payload is None:
            self.work = self.comm.iallreduce_(self.buf)
            return
        # the parameters' change since x_g in 16 bits; buffers and flags in float32
        assert self.outer is not None and self.outer.x_g is not None
        self.wire = self.comm.iallreduce_(self.payload.pack(self.snap[:p], self.outer.x_g))
        self.work = self.comm.iallreduce_(self.buf[p:])

    def test(self) -> bool:
        """Drive progress; True when the round completed (call :meth:`apply` then)."""
        if self.work is None:
            return False
        if self.wire is not None and not self.wire.test():
            return False
        return self.work.test()

    def wait(self, timeout: float | None = None) -> None:
        assert self.work is not None
        if self.wire is not None:
            self.wire.wait(timeout)
        self.work.wait(timeout)

    def overdue(self) -> None:
        """Raise the engine's error naming the missing ranks if the round in flight has
        passed the communicator's deadline, counted from its posting (a finished rank that
        polls, or trains on, must not wait forever)."""
        waited = time.perf_counter() - self.posted_at
        if self.work is not None and waited > self.comm.timeout:
            (self.wire or self.work).wait(waited=waited)

    def apply(self) -> bool:
        """Add ``mean(x_s) - x_s`` to the live model; True if every rank had finished."""
        self.work = self.wire = None
        self.inflight_s += time.perf_counter() - self.posted_at
        self.rounds += 1
        size = self.comm.size
        all_finished = round(float(self.buf[-2])) == size
        self.closed = all_finished
        if self.budget is not None:
            self.budget.record(float(self.buf[-1]), self.at_post)
        p = self.flat.n_params
        if self.outer is None:
            self.buf.div_(size).sub_(self.snap)  # delta = mean - x_s
        else:  # delta = x_g' - x_s, x_g' the outer step's from mean(x_s)
            self.buf.div_(size)
            if self.payload is None:
                mean = self.buf[:p]
            else:
                assert self.outer.x_g is not None
                mean = self.payload.mean(self.outer.x_g, size)
            self.buf[:p].copy_(self.outer.step(mean)).sub_(self.snap[:p])
            self.buf[p:].sub_(self.snap[p:])
        self.rule.add_(self.buf[:p])
        self.flat.data[p:].add_(self.buf[p:-TAIL])
        return all_finished

    def drain(self, step: int) -> float:
        """After this rank's last step: keep taking part in rounds (as finished) until every
        rank has finished. Returns the seconds spent waiting."""
        return drain_all([self], step)


def settle_all(rounds: list[AsyncRound], step: int) -> bool:
    """One non-blocking pass over round streams of a rank that has finished its steps: post a
    round flagged "finished" where none is in flight, apply those that completed. True once
    every stream has seen all ranks finished (the rank may keep training meanwhile: a round's
    delta is added to the model that moved on)."""
    for r in rounds:
        if r.closed:
            continue
        if not r.busy:
            r.start(finished=True, step=step)
        elif r.test():
            r.apply()
        else:
            r.overdue()
    return all(r.closed for r in rounds)


def drain_all(rounds: list[AsyncRound], step: int) -> float:
    """Drain several round streams (on different communicators) TOGETHER: progress is driven
    on all of them at once, because a peer may be blocked on another stream's round that
    needs us (waiting for one stream after the other can deadlock). The streams are open
    again afterwards (a checkpoint drains mid-run). Returns seconds waited."""
    t0 = time.perf_counter()
    poll = Poller(None)  # the deadline is each round's own (``settle_all``)
    while not settle_all(rounds, step):
        poll.idle()
    for r in rounds:
        r.closed = False
    return time.perf_counter() - t0
