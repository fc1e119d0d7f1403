"""HOGWILD! (Recht et al., NeurIPS 2011): lock-free, in-place updates of the shared model.

Workers read the shared parameters without any synchronisation (a read may mix two updates)
and write ``p -= lr * d`` in place; momentum stays private to each worker. A shared atomic
counter of applied updates gives each gradient's staleness (updates by others meanwhile).
"""

from __future__ import annotations

import torch

from hpc_asgd.shm.base import Applied, AtomicArray


class Hogwild:
    name = "hogwild"

    def __init__(self, params: torch.Tensor):
        self.params = params  # (n_params,) view of the shared flat buffer
        self.version = AtomicArray(1)  # updates applied so far, by every worker
        self.read_version = 0

    def attach(self, worker: int) -> None:
        self.read_version = 0

    def read(self) -> torch.Tensor:
        self.read_version = self.version[0].load()
        return self.params

    def apply(self, d: torch.Tensor, lr: float, block: slice | None = None) -> Applied:
        if block is None:
            self.params.add_(d, alpha=-lr)
        else:
            self.params[block].add_(d, alpha=-lr)
        return Applied(staleness=self.version[0].fetch_inc() - self.read_version)

    def snapshot(self, out: torch.Tensor) -> None:
        out.copy_(self.params)

    def add_(self, delta: torch.Tensor) -> None:
        self.params.add_(delta)

    def load(self, src: torch.Tensor) -> None:
        """Replace the parameters by ``src`` (workers paused)."""
        if src is not self.params:
            self.params.copy_(src)

    def publish(self) -> None:
        return None  # the shared buffer is the model
