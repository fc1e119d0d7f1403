"""HOGWILD! (Recht et al., NeurIPS 2011): lock-free, in-place updates of the shared model.

Workers read the shared parameters without any synchronisation (a read may mix two updates)
and write ``p -= lr * d`` in place; momentum stays private to each worker. A shared atomic
counter of applied updates gives each gradient's staleness (updates by others meanwhile).

With more than one worker, a read copies the shared vector into the worker's own buffer (one
pass, no lock: still an unsynchronised, possibly mixed read) and the gradient is computed on
that copy. Computing on the shared vector itself, which the other workers write meanwhile,
made the forward and backward passes miss the cache on every line another core had written:
at W = 2 on a 2-core machine that cost more than the copy (W = 2 / W = 1 1.52x against
1.79x for ``locked``, which copies; ``benchmarks/results/shm_scaling_epochs.md``).

``max_staleness`` S > 0 drops a gradient whose staleness exceeds S when it is about to be
written (not applied, reported as dropped), the bounded-delay condition of the asynchronous
SGD analyses (e.g. Lian et al., NeurIPS 2015). HOGWILD! has no lock, so the check and the
write are not one atomic step: others may still land in between, so the staleness reported
for an applied gradient (counted at its write) can exceed S.
"""

from __future__ import annotations

from typing import Any

import torch

from hpc_asgd.registry import UPDATE_RULES
from hpc_asgd.rules.base import Applied, AtomicArray, InPlace


@UPDATE_RULES.register("hogwild")
class Hogwild(InPlace):
    """In place, lock-free (snapshot, correction, load: :class:`InPlace`'s), with the
    staleness count and bound, and private reads with several workers."""

    @classmethod
    def from_config(cls, cfg: Any, params: torch.Tensor, ctx) -> Hogwild:
        return cls(params, cfg.workers.max_staleness, copy_reads=cfg.workers.workers > 1)

    def __init__(self, params: torch.Tensor, max_staleness: int = 0, copy_reads: bool = False):
        super().__init__(params)  # (n_params,) view of the shared flat buffer
        self.version = AtomicArray(1)  # updates applied so far, by every worker
        self.max_staleness = max_staleness  # S: drop gradients staler than S; 0 = never
        self.read_version = 0
        self.copy_reads = copy_reads
        self.local: torch.Tensor | None = None  # (n_params,) this worker's read, if it copies

    def attach(self, worker: int) -> None:
        self.read_version = 0
        if self.copy_reads:  # in the worker's process: private memory
            self.local = torch.empty_like(self.params)

    def read(self) -> torch.Tensor:
        self.read_version = self.version[0].load()
        if self.local is None:
            return self.params
        self.local.copy_(self.params)
        return self.local

    def apply(self, d: torch.Tensor, lr: float, block: slice | None = None) -> Applied:
        if self.max_staleness:
            staleness = self.version[0].load() - self.read_version
            if staleness > self.max_staleness:
                return Applied(applied=False, staleness=staleness)
        if block is None:
            self.params.add_(d, alpha=-lr)
        else:
            self.params[block].add_(d, alpha=-lr)
        return Applied(staleness=self.version[0].fetch_inc() - self.read_version)
