"""The update-rule seam, and the shared-memory primitives the rules are built from.

An update rule decides how W worker processes of one rank read and write the ONE model they
share (the parameter part of the flat buffer, ``(n_params,)``). A worker step is:

    p = rule.read()                 # parameters to compute the gradient at
    ... forward / backward at p ...
    d = optimizer.direction(p, g)   # private momentum and weight decay
    rule.apply(d, lr)               # p_shared -= lr * d, as the rule allows

The rank's main process (the averager) uses ``snapshot`` and ``add_`` to average across ranks
without losing a concurrent update, and ``publish`` at the end to leave the final parameters in
the flat buffer. Rules are built in the main process, pickled to the spawned workers (shared
tensors travel as shared memory), and ``attach``-ed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import atomics
import torch

HIST_BINS = 16  # staleness 0..14 and >= 15; CAS tries 1..15 and >= 16


@dataclass
class Applied:
    """What one ``apply`` did: applied (or dropped over the persistence bound), how stale the
    gradient was (updates by others between read and write), how many CAS tries it took,
    and the seconds spent waiting for a lock."""

    applied: bool = True
    staleness: int = 0
    tries: int = 1
    lock_wait_s: float = 0.0


class UpdateRule(Protocol):
    name: str

    def attach(self, worker: int) -> None:
        """In the worker process: make the private state (buffers, atomic views)."""
        ...

    def read(self) -> torch.Tensor:
        """``(n_params,)`` parameters to compute the next gradient at."""
        ...

    def apply(self, d: torch.Tensor, lr: float, block: slice | None = None) -> Applied:
        """Update the shared parameters by ``-lr * d``; with ``block``, ``d`` is
        ``params[block]``-sized and only that block moves (a partial step)."""
        ...

    def snapshot(self, out: torch.Tensor) -> None:
        """Copy the current parameters into ``out`` (consistent where the rule is)."""
        ...

    def add_(self, delta: torch.Tensor) -> None:
        """``params += delta`` without losing any concurrent update (the averager's correction)."""
        ...

    def load(self, src: torch.Tensor) -> None:
        """Make ``src`` the parameters (start, or a blocking average with workers paused)."""
        ...

    def publish(self) -> None:
        """Leave the latest parameters in the flat buffer (workers paused or stopped)."""
        ...


class AtomicArray:
    """int64 cells in shared memory with atomic operations (``atomics`` on a shared tensor).

    The tensor pickles to spawned processes as shared memory; the atomic views are opened
    lazily in each process, since they cannot travel.
    """

    def __init__(self, n: int):
        self.t = torch.zeros(n, dtype=torch.int64).share_memory_()
        self._views: dict[int, object] = {}
        self._ctx: list = []

    def __getstate__(self) -> dict:
        return {"t": self.t}

    def __setstate__(self, state: dict) -> None:
        self.t, self._views, self._ctx = state["t"], {}, []

    def __getitem__(self, i: int):
        v = self._views.get(i)
        if v is None:
            ctx = atomics.atomicview(
                buffer=self.t.numpy()[i : i + 1].data.cast("B"), atype=atomics.INT
            )
            v = self._views[i] = ctx.__enter__()
            self._ctx.append(ctx)
        return v

    def close(self) -> None:
        for ctx in self._ctx:
            ctx.__exit__(None, None, None)
        self._ctx, self._views = [], {}

    def __del__(self) -> None:
        self.close()


def bin_of(value: int) -> int:
    return min(max(value, 0), HIST_BINS - 1)
