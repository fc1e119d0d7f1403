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

Each registered rule also carries the application's adapter: ``from_config`` and ``validate``
read the application's configuration by its field names (``cfg.workers.persistence``); the
library never imports it. :class:`InPlace` is the rule of a plain loop whose own optimizer
writes the parameters (the Python API's default).
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import atomics
import torch


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
    name: str  # the --update value it is registered under

    @classmethod
    def from_config(cls, cfg: Any, params: torch.Tensor, ctx) -> UpdateRule:
        """Built in the rank's main process over ``params`` (the shared flat buffer's
        parameter part, ``(n_params,)``) from the application's configuration ``cfg``;
        ``ctx`` is the spawn context (for locks)."""
        ...

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """This rule's own rules on ``cfg`` (ConfigError), checked before any collective."""
        ...

    def block_for(self, epoch: float) -> slice | None:
        """The block of the parameters the worker's next step updates alone (partial
        backpropagation), or None for a full step."""
        ...

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


class RuleDefaults:
    """What most rules share: no rules of their own to check, full steps only."""

    @classmethod
    def validate(cls, cfg: Any) -> None:
        return None

    def block_for(self, epoch: float) -> slice | None:
        return None


class InPlace(RuleDefaults):
    """One process whose own optimizer (any ``torch.optim.Optimizer``) updates the
    parameters in place, ``(n_params,)`` views of the flat buffer: the rule of a user's plain
    training loop. The averager's snapshot, correction and load act on the buffer directly;
    ``read`` and ``apply`` (the rank's own steps) are the direct ones."""

    name = "in-place"

    @classmethod
    def from_config(cls, cfg: Any, params: torch.Tensor, ctx) -> InPlace:
        return cls(params)

    def __init__(self, params: torch.Tensor):
        self.params = params

    def attach(self, worker: int) -> None:
        return None

    def read(self) -> torch.Tensor:
        return self.params

    def apply(self, d: torch.Tensor, lr: float, block: slice | None = None) -> Applied:
        (self.params if block is None else self.params[block]).add_(d, alpha=-lr)
        return Applied()

    def snapshot(self, out: torch.Tensor) -> None:
        out.copy_(self.params)

    def add_(self, delta: torch.Tensor) -> None:
        self.params.add_(delta)

    def load(self, src: torch.Tensor) -> None:
        """Replace the parameters by ``src`` (workers paused)."""
        if src is not self.params:
            self.params.copy_(src)

    def publish(self) -> None:
        return None  # the flat buffer is the model


class Word:
    """One int64 cell with sequentially consistent atomic operations.

    The operations are ``atomics``' own (patomic's C functions, found once through the public
    ``atomicview``), called directly through their ctypes pointers with preallocated argument
    cells: the package's Python wrappers cost 12 us per load and 42 us per CAS here (measured),
    a direct call about 1 us, which matters on a worker's hot path of ~10 operations per step.
    """

    __slots__ = (
        "__weakref__",  # (``weakref.finalize``)
        "_a",
        "_addr",
        "_b",
        "_cas",
        "_ctx",
        "_done",
        "_fadd",
        "_load",
        "_pa",
        "_pb",
        "_store",
        "_view",
    )

    def __init__(self, buffer: memoryview):
        from atomics._impl.enums import OpType  # the ops table is keyed by it

        self._ctx = atomics.atomicview(buffer=buffer, atype=atomics.INT)
        self._view = self._ctx.__enter__()
        # Closed at the latest when the interpreter exits, before its teardown collects the
        # context in some order: collected open, it raises "Cannot call 'release' while
        # context is open" (ignored, but printed) from its __del__.
        self._done = weakref.finalize(self, self._ctx.__exit__, None, None, None)
        core = self._view._core
        self._addr = core.address
        self._load = core.get_op_func(OpType.LOAD)
        self._store = core.get_op_func(OpType.STORE)
        self._cas = core.get_op_func(OpType.CMPXCHG_STRONG)
        self._fadd = core.get_op_func(OpType.FETCH_ADD)
        if None in (self._load, self._store, self._cas, self._fadd):
            raise RuntimeError("atomics: no lock-free 8-byte load/store/CAS/fetch-add here")
        self._a, self._b = ctypes.c_int64(), ctypes.c_int64()  # argument / result cells
        self._pa, self._pb = ctypes.addressof(self._a), ctypes.addressof(self._b)

    def load(self) -> int:
        self._load(self._addr, _SEQ_CST, self._pa)
        return self._a.value

    def store(self, value: int) -> None:
        self._a.value = value
        self._store(self._addr, self._pa, _SEQ_CST)

    def fetch_add(self, value: int) -> int:
        """Add ``value``; returns the value before."""
        self._a.value = value
        self._fadd(self._addr, self._pa, _SEQ_CST, self._pb)
        return self._b.value

    def fetch_inc(self) -> int:
        return self.fetch_add(1)

    def fetch_dec(self) -> int:
        return self.fetch_add(-1)

    def inc(self) -> None:
        self.fetch_add(1)

    def cas(self, expected: int, desired: int) -> bool:
        """Compare-and-swap: ``expected`` -> ``desired``; True when it swapped."""
        self._a.value, self._b.value = expected, desired
        return bool(self._cas(self._addr, self._pa, self._pb, _SEQ_CST, _SEQ_CST))

    def close(self) -> None:
        self._done()  # (once)


_SEQ_CST = atomics.MemoryOrder.SEQ_CST.value


class AtomicArray:
    """int64 cells in shared memory with atomic operations (``Word``s on a shared tensor).

    The tensor pickles to spawned processes as shared memory; the words are opened lazily in
    each process, since they cannot travel.
    """

    def __init__(self, n: int):
        self.t = torch.zeros(n, dtype=torch.int64).share_memory_()
        self._words: dict[int, Word] = {}

    def __getstate__(self) -> dict:
        return {"t": self.t}

    def __setstate__(self, state: dict) -> None:
        self.t, self._words = state["t"], {}

    def __getitem__(self, i: int) -> Word:
        w = self._words.get(i)
        if w is None:
            w = self._words[i] = Word(self.t.numpy()[i : i + 1].data.cast("B"))
        return w

    def close(self) -> None:
        for w in self._words.values():
            w.close()
        self._words = {}

    def __del__(self) -> None:
        self.close()
