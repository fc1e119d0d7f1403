"""A round every K node steps, with post-local SGD's warm-up: the base of local SGD, LASGD and
local-async (each its own file)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpc_asgd.comm import Comm
from hpc_asgd.errors import ConfigError
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.base import Averaging, outer_args
from hpc_asgd.sync.outer import outer_of


def steps_of_epochs(epochs: float, steps_per_epoch: int) -> int:
    """The first node step ``s`` with ``s / steps_per_epoch >= epochs``: where the application's
    epoch-based warm-up (``--post-local-epochs``) ends, in the steps the library counts."""
    s = max(0, int(epochs * steps_per_epoch))
    while s > 0 and (s - 1) / steps_per_epoch >= epochs:
        s -= 1
    while s / steps_per_epoch < epochs:
        s += 1
    return s


class Periodic(Averaging):
    """A round every K (``period``) local node steps; K = 1 for the first ``warmup_steps``
    (post-local SGD, Lin et al., ICLR 2020; torch's ``PeriodicModelAverager`` calls it
    ``warmup_steps`` too). ``outer_lr``, ``outer_momentum``, ``outer_nesterov``: the rounds'
    outer optimizer (``hpc_asgd.sync.outer``; lr 1, momentum 0: plain averaging)."""

    outer_step = True

    def __init__(
        self,
        model: nn.Module | FlatModel,
        optimizer: torch.optim.Optimizer | None = None,
        comm: Comm | None = None,
        *,
        period: int,
        warmup_steps: int = 0,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_nesterov: bool = False,
        **kw: Any,
    ):
        """``avg_dtype``: ``bf16`` | ``fp16`` sends the rounds' parameters in 16 bits, with
        error feedback (``hpc_asgd.sync.payload``); ``fp32`` (default) the model itself."""
        if not (isinstance(period, int) and period >= 1):
            raise ConfigError(f"period: must be a positive whole number of steps, got {period!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ConfigError(f"warmup_steps: must be a whole number >= 0, got {warmup_steps!r}")
        self.period, self.warmup_steps = period, warmup_steps
        kw["outer"] = outer_of(outer_lr, outer_momentum, outer_nesterov)
        super().__init__(model, optimizer, comm, **kw)

    @classmethod
    def from_config(
        cls, cfg: Any, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> Periodic:
        s = cfg.sync
        warmup = steps_of_epochs(s.post_local_epochs, steps_per_epoch)
        return cls(
            flat, None, comm, rule=rule, period=s.period, warmup_steps=warmup,
            **outer_args(cfg),
        )  # fmt: skip

    def period_at(self, step: int) -> int:
        """K at node step ``step``: the node steps from a round to the next."""
        return 1 if step < self.warmup_steps else self.period
