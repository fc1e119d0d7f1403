"""Non-blocking averaging rounds that overlap training, without losing concurrent updates.

A round snapshots the model ``x_s`` (parameters through the update rule, which may keep its own
versions, and the float buffers), allreduces the snapshot in the background while training
goes on, and on completion adds ``mean(x_s) - x_s`` to the model that moved on:

    x  <-  x + (mean(x_s) - x_s)          (every update made meanwhile is kept)

The round's buffer carries one extra element, this rank's "finished training" flag, so the
ranks can end a stream of order-matched rounds together: when a round's flags sum to the world
size, every rank has seen the same thing in the same round and stops after it.
"""

from __future__ import annotations

import time

import torch

from hpc_asgd.comm import Comm, Work
from hpc_asgd.comm.base import Poller
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import UpdateRule


class AsyncRound:
    """At most one round in flight on ``comm`` (a communicator of its own: its collectives
    never interleave with the evaluation's)."""

    def __init__(self, comm: Comm, flat: FlatModel, rule: UpdateRule):
        self.comm, self.flat, self.rule = comm, flat, rule
        n = len(flat)
        self.buf = torch.zeros(n + 1, dtype=flat.data.dtype)  # [x_s (params, buffers), finished]
        self.snap = torch.zeros(n + 1, dtype=flat.data.dtype)
        self.work: Work | None = None
        self.posted_at = 0.0
        self.rounds = 0
        self.inflight_s = 0.0  # wall time rounds spent in flight (training went on meanwhile)
        self.closed = False  # a round saw every rank finished: the stream has ended

    @property
    def busy(self) -> bool:
        return self.work is not None

    def start(self, finished: bool) -> None:
        """Snapshot the model and post the allreduce of the snapshot."""
        p = self.flat.n_params
        self.rule.snapshot(self.buf[:p])
        self.buf[p:-1].copy_(self.flat.data[p:])
        self.buf[-1] = float(finished)
        self.snap.copy_(self.buf)
        self.posted_at = time.perf_counter()
        self.work = self.comm.iallreduce_(self.buf)

    def test(self) -> bool:
        """Drive progress; True when the round completed (call :meth:`apply` then)."""
        return self.work is not None and self.work.test()

    def wait(self, timeout: float | None = None) -> None:
        assert self.work is not None
        self.work.wait(timeout)

    def overdue(self) -> None:
        """Raise the engine's error naming the missing ranks if the round in flight has
        passed the communicator's deadline, counted from its posting (a finished rank that
        polls, or trains on, must not wait forever)."""
        waited = time.perf_counter() - self.posted_at
        if self.work is not None and waited > self.comm.timeout:
            self.work.wait(waited=waited)

    def apply(self) -> bool:
        """Add ``mean(x_s) - x_s`` to the live model; True if every rank had finished."""
        self.work = None
        self.inflight_s += time.perf_counter() - self.posted_at
        self.rounds += 1
        size = self.comm.size
        all_finished = round(float(self.buf[-1])) == size
        self.closed = all_finished
        self.buf.div_(size).sub_(self.snap)  # delta = mean - x_s
        p = self.flat.n_params
        self.rule.add_(self.buf[:p])
        self.flat.data[p:].add_(self.buf[p:-1])
        return all_finished

    def drain(self) -> float:
        """After this rank's last step: keep taking part in rounds (as finished) until every
        rank has finished. Returns the seconds spent waiting."""
        return drain_all([self])


def settle_all(rounds: list[AsyncRound]) -> bool:
    """One non-blocking pass over round streams of a rank that has finished its steps: post a
    round flagged "finished" where none is in flight, apply those that completed. True once
    every stream has seen all ranks finished (the rank may keep training meanwhile: a round's
    delta is added to the model that moved on)."""
    for r in rounds:
        if r.closed:
            continue
        if not r.busy:
            r.start(finished=True)
        elif r.test():
            r.apply()
        else:
            r.overdue()
    return all(r.closed for r in rounds)


def drain_all(rounds: list[AsyncRound]) -> float:
    """Drain several round streams (on different communicators) TOGETHER: progress is driven
    on all of them at once, because a peer may be blocked on another stream's round that
    needs us (waiting for one stream after the other can deadlock). The streams are open
    again afterwards (a checkpoint drains mid-run). Returns seconds waited."""
    t0 = time.perf_counter()
    poll = Poller(None)  # the deadline is each round's own (``settle_all``)
    while not settle_all(rounds):
        poll.idle()
    for r in rounds:
        r.closed = False
    return time.perf_counter() - t0
