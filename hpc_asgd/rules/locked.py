"""Lock-based asynchronous SGD: the baseline Leashed-SGD is measured against.

One lock (a process-shared mutex) around the read-copy of the shared parameters into a private
buffer, and around the in-place update, so reads are never torn but workers queue at the lock.
Records the time spent waiting for it.

``max_staleness`` S > 0 drops a gradient computed more than S updates ago (not applied,
reported as dropped): the bounded-delay condition of the asynchronous SGD analyses (e.g. Lian
et al., NeurIPS 2015). Checked under the lock, so no applied gradient is ever staler than S.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hpc_asgd.registry import UPDATE_RULES
from hpc_asgd.rules.base import Applied, AtomicArray, RuleDefaults


@UPDATE_RULES.register("locked")
class Locked(RuleDefaults):
    @classmethod
    def from_config(cls, cfg: Any, params: torch.Tensor, ctx) -> Locked:
        return cls(params, ctx, cfg.workers.max_staleness)

    def __init__(self, params: torch.Tensor, ctx, max_staleness: int = 0):
        self.params = params  # (n_params,) view of the shared flat buffer
        self.lock = ctx.Lock()
        self.version = AtomicArray(1)
        self.max_staleness = max_staleness  # S: drop gradients staler than S; 0 = never
        self.local: torch.Tensor | None = None
        self.read_version = 0
        self.read_wait = 0.0  # lock wait of the last read, reported with the update

    def attach(self, worker: int) -> None:
        self.local = torch.empty_like(self.params)  # private copy the gradient is computed at

    def _acquire(self) -> float:
        t0 = time.perf_counter()
        self.lock.acquire()
        return time.perf_counter() - t0

    def read(self) -> torch.Tensor:
        if self.local is None:
            self.attach(0)
        assert self.local is not None  # attach() made it
        waited = self._acquire()
        try:
            self.local.copy_(self.params)
            self.read_version = self.version[0].load()
        finally:
            self.lock.release()
        self.read_wait = waited
        return self.local

    def apply(self, d: torch.Tensor, lr: float, block: slice | None = None) -> Applied:
        waited = self._acquire() + self.read_wait
        try:
            staleness = self.version[0].load() - self.read_version  # exact: we hold the lock
            if self.max_staleness and staleness > self.max_staleness:
                return Applied(applied=False, staleness=staleness, lock_wait_s=waited)
            if block is None:
                self.params.add_(d, alpha=-lr)
            else:
                self.params[block].add_(d, alpha=-lr)
            self.version[0].inc()
        finally:
            self.lock.release()
        return Applied(staleness=staleness, lock_wait_s=waited)

    def snapshot(self, out: torch.Tensor) -> None:
        with self.lock:
            out.copy_(self.params)

    def add_(self, delta: torch.Tensor) -> None:
        with self.lock:
            self.params.add_(delta)

    def load(self, src: torch.Tensor) -> None:
        if src is not self.params:
            with self.lock:
                self.params.copy_(src)

    def publish(self) -> None:
        return None
