"""Partitioned updates with partial backpropagation: LPP-SGD / PASSM+ (Kungurtsev, Bapi et
al., "Scaling the Wild", arXiv 2203.06638; reference code bapi/LPP-SGD).

The parameters ``(n_params,)`` are split into W contiguous blocks of about equal size, one per
worker. Until ``switch_epoch`` every step is a full HOGWILD! step. After it, each worker
alternates a full step with a partial one that backpropagates only to the parameters of its
own block (autograd skips the weight gradients of the others, and stops early when the block
sits near the output) and updates only that block, in place and lock-free.
"""

from __future__ import annotations

from typing import Any

import torch

from hpc_asgd.errors import ConfigError
from hpc_asgd.registry import UPDATE_RULES
from hpc_asgd.rules.hogwild import Hogwild


def blocks(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``range(n)`` whose sizes differ by at most one."""
    q, r = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + q + (i < r))
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


@UPDATE_RULES.register("partitioned")
class Partitioned(Hogwild):
    @classmethod
    def from_config(cls, cfg: Any, params: torch.Tensor, ctx) -> Partitioned:
        w = cfg.workers
        return cls(params, w.workers, w.partition_after_epochs)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.workers.max_staleness:
            raise ConfigError(
                "max_staleness: only for --update hogwild or locked, not 'partitioned' "
                "(its block steps count as updates)"
            )

    def __init__(self, params: torch.Tensor, workers: int, switch_epoch: float):
        super().__init__(params)
        self.blocks = blocks(params.numel(), workers)
        self.switch_epoch = switch_epoch
        self.worker = 0
        self.local_steps = 0

    def attach(self, worker: int) -> None:
        super().attach(worker)
        self.worker, self.local_steps = worker, 0

    def block_for(self, epoch: float) -> slice | None:
        """The block this worker's next step updates alone, or None for a full step."""
        self.local_steps += 1
        if epoch < self.switch_epoch or self.local_steps % 2:
            return None
        return self.blocks[self.worker]
