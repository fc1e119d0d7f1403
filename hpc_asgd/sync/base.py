"""The synchroniser seam: what happens across ranks around each local step.

A synchroniser sees the flat model (``FlatModel``) and a ``Comm``; it never sees the engine,
the data or the update rule. Hooks, in the order the driver calls them:

    start()                       once: every rank takes rank 0's initial model
    grads_ready(step)             after backward, before the update (synchronous SGD)
    step_done(step, epoch)        after the update (periodic averaging)
    finish()                      once: final exact average, so consensus is bitwise
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel


class Synchronizer(Protocol):
    promises_consensus: bool
    rounds: int  # averaging (or gradient-averaging) rounds done
    wait_s: float  # seconds the training loop spent blocked in this synchroniser's collectives

    def start(self) -> None: ...

    def grads_ready(self, step: int) -> None: ...

    def step_done(self, step: int, epoch: float) -> None: ...

    def finish(self) -> None: ...


class Averaging:
    """Shared plumbing: a comm, a flat model, timers and the exact averages every algorithm uses."""

    promises_consensus = True

    def __init__(self, comm: Comm, flat: FlatModel):
        self.comm, self.flat = comm, flat
        self.rounds = 0
        self.wait_s = 0.0

    def average_(self, t: torch.Tensor, comm: Comm | None = None) -> None:
        """``t <- mean over the ranks of comm of t``, blocking; counts the time waited."""
        comm = comm or self.comm
        if comm.size == 1:
            return
        t0 = time.perf_counter()
        comm.allreduce_(t)
        t.div_(comm.size)
        self.wait_s += time.perf_counter() - t0

    def start(self) -> None:
        self.comm.bcast_(self.flat.data, root=0)

    def grads_ready(self, step: int) -> None:
        return None

    def step_done(self, step: int, epoch: float) -> None:
        return None

    def finish(self) -> None:
        """Average parameters and buffers exactly once more, then take rank 0's bits: an
        allreduce alone may round differently on different ranks (recursive doubling)."""
        if not self.promises_consensus or self.comm.size == 1:
            return
        self.average_(self.flat.data)
        self.comm.bcast_(self.flat.data, root=0)
