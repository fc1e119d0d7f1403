"""Leashed-SGD (Bäckström, Walulya, Papatriantafilou, Tsigas; IPDPS 2021, arXiv 2102.09032).

Consistency-preserving lock-free SGD. The shared state is ONE atomic word naming the latest
immutable parameter version; versions live in a pool of ``slots`` buffers ``(slots, n_params)``
in shared memory:

    latest = (version_number << 8) | slot          # one int64, swapped by compare-and-swap

A reader increments the slot's reader count, then checks that ``latest`` did not move (else it
backs off and retries), so it computes its gradient on a version no writer touches. A writer
takes a free slot, copies the latest version into it, applies its step and CASes ``latest`` from
the version it copied to its own; on failure it retries with the same step. The persistence
bound B caps the CAS attempts, the first one included: after B failed tries the gradient is
dropped (B = 0: unbounded), so ``Applied.tries`` <= B always. The replaced version is
retired, and freed by whoever sees it retired with no readers (the writer or the last reader).
Slot states: FREE -> OWNED (a writer's) -> LIVE (published or being published) -> RETIRED -> FREE.
Records staleness (versions between read and write) and CAS tries.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hpc_asgd.errors import ConfigError
from hpc_asgd.registry import UPDATE_RULES
from hpc_asgd.rules.base import Applied, AtomicArray, RuleDefaults

FREE, OWNED, LIVE, RETIRED = 0, 1, 2, 3
_SLOT = 0xFF


@UPDATE_RULES.register("leashed")
class Leashed(RuleDefaults):
    @classmethod
    def from_config(cls, cfg: Any, params: torch.Tensor, ctx) -> Leashed:
        return cls(params, cfg.workers.workers, cfg.workers.persistence)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        w = cfg.workers
        if w.max_staleness:
            raise ConfigError(
                "max_staleness: only for --update hogwild or locked, not 'leashed' "
                "(Leashed-SGD bounds its retries with --persistence)"
            )
        if w.workers > 120:
            raise ConfigError(
                f"workers: Leashed-SGD supports at most 120 workers per rank, got {w.workers}"
            )

    def __init__(self, params: torch.Tensor, workers: int, persistence: int = 0):
        self.params = params  # (n_params,) view of the flat buffer: the initial and final model
        # Each worker holds at most one version to read and one to write; +1 latest, +2 for
        # the averager's snapshot and correction, +1 spare.
        self.slots = 2 * workers + 4
        if self.slots > _SLOT + 1:
            raise ValueError(f"leashed: at most {(_SLOT - 3) // 2} workers per rank")
        self.pool = torch.empty((self.slots, params.numel()), dtype=params.dtype).share_memory_()
        self.pool[0].copy_(params)
        # cells: [latest, readers[0..slots), state[0..slots)]
        self.ctl = AtomicArray(1 + 2 * self.slots)
        self.ctl.t[1 + self.slots] = LIVE  # slot 0 holds version 0
        self.persistence = persistence
        self.held: int | None = None  # slot this process reads (its gradient's version)
        self.mine: int | None = None  # slot this process owns for its next write
        self.read_version = 0

    # ---- cells -----------------------------------------------------------------------------
    def _latest(self):
        return self.ctl[0]

    def _readers(self, slot: int):
        return self.ctl[1 + slot]

    def _state(self, slot: int):
        return self.ctl[1 + self.slots + slot]

    # ---- reclamation -----------------------------------------------------------------------
    def _acquire(self) -> int:
        """Pin the latest version for reading; returns its word."""
        latest = self._latest()
        while True:
            word = latest.load()
            slot = word & _SLOT
            self._readers(slot).inc()
            if latest.load() == word:
                return word
            self._release(slot)  # the version moved on before we pinned it: retry

    def _release(self, slot: int) -> None:
        if self._readers(slot).fetch_dec() == 1 and self._state(slot).load() == RETIRED:
            self._state(slot).cas(RETIRED, FREE)

    def _retire(self, slot: int) -> None:
        self._state(slot).store(RETIRED)
        if self._readers(slot).load() == 0:
            self._state(slot).cas(RETIRED, FREE)

    def _claim(self) -> int:
        while True:
            for slot in range(self.slots):
                state = self._state(slot)
                if state.load() == FREE and state.cas(FREE, OWNED):  # load first: cheap
                    return slot
            time.sleep(0)  # every slot busy: only possible beyond the sized-for concurrency

    # ---- the rule --------------------------------------------------------------------------
    def attach(self, worker: int) -> None:
        self.held = self.mine = None

    def read(self) -> torch.Tensor:
        if self.held is not None:
            self._release(self.held)
        word = self._acquire()
        self.held, self.read_version = word & _SLOT, word >> 8
        return self.pool[self.held]

    def _publish_step(self, step, bound: int) -> tuple[bool, int, int]:
        """``step(own, latest)`` writes the next version into this writer's slot from the
        latest one (one pass: copying first, then stepping in place, read and wrote the
        model twice, ~0.1 ms a step for a 135k-parameter MLP); CAS; retry up to ``bound``
        (0: forever)."""
        mine = self.mine if self.mine is not None else self._claim()
        tries = 0
        while True:
            tries += 1
            word = self._acquire()
            new = self.pool[mine]
            step(new, self.pool[word & _SLOT])
            self._release(word & _SLOT)
            # LIVE before the CAS: once published, a later writer may retire it at any time.
            self._state(mine).store(LIVE)
            desired = (((word >> 8) + 1) << 8) | mine
            if self._latest().cas(word, desired):
                self._retire(word & _SLOT)
                self.mine = None
                return True, tries, word >> 8
            self._state(mine).store(OWNED)
            if bound and tries >= bound:
                self.mine = mine  # keep the slot for the next gradient
                return False, tries, word >> 8

    def apply(self, d: torch.Tensor, lr: float, block: slice | None = None) -> Applied:
        if self.held is not None:  # the gradient is computed: its version may be reclaimed
            self._release(self.held)
            self.held = None

        def step(new: torch.Tensor, latest: torch.Tensor) -> None:
            if block is None:
                torch.add(latest, d, alpha=-lr, out=new)
            else:
                new.copy_(latest)
                new[block].add_(d, alpha=-lr)

        ok, tries, base = self._publish_step(step, self.persistence)
        return Applied(applied=ok, staleness=base - self.read_version, tries=tries)

    def snapshot(self, out: torch.Tensor) -> None:
        word = self._acquire()
        out.copy_(self.pool[word & _SLOT])
        self._release(word & _SLOT)

    def add_(self, delta: torch.Tensor) -> None:
        self._publish_step(lambda new, latest: torch.add(latest, delta, out=new), 0)

    def load(self, src: torch.Tensor) -> None:
        """Publish ``src`` as the next version."""
        self._publish_step(lambda new, _: new.copy_(src), 0)

    def publish(self) -> None:
        self.snapshot(self.params)
