"""SGD on a flat parameter buffer, and learning-rate schedules.

One fused update over the whole ``(n_params,)`` buffer instead of a loop over tensors. The
arithmetic is torch.optim.SGD's (dampening 0):

    d = g + wd * p;  buf = m * buf + d;  d = d + m * buf (Nesterov) or buf;  p -= lr * d

The momentum buffer is private to its owner: under shared-memory updates every worker keeps its
own (HOGWILD!'s convention); across ranks, K-AVG keeps each rank's local momentum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class FlatSGD:
    def __init__(self, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buf: torch.Tensor | None = None  # (n_params,) momentum, made on the first step

    def direction(self, params: torch.Tensor, grad: torch.Tensor, block: slice | None = None):
        """The step ``d`` of ``params -= lr * d``; ``grad`` may be overwritten. With ``block``
        (a partial step), ``d`` covers only ``params[block]`` and only that slice of the
        momentum moves."""
        if self.momentum and self.buf is None:
            self.buf = torch.zeros_like(grad)  # m * 0 + d == d: torch's first-step clone, exactly
        if block is not None:
            params, grad = params[block], grad[block]
        d = grad
        if self.weight_decay:
            d = d.add_(params, alpha=self.weight_decay)
        if self.momentum:
            assert self.buf is not None  # made above on the first step
            buf = self.buf if block is None else self.buf[block]
            buf.mul_(self.momentum).add_(d)
            d = d.add_(buf, alpha=self.momentum) if self.nesterov else buf
        return d

    def step(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        params.add_(self.direction(params, grad), alpha=-lr)

    def state_dict(self) -> dict:
        return {"buf": self.buf}

    def load_state_dict(self, state: dict) -> None:
        self.buf = state["buf"]


@dataclass(frozen=True)
class Schedule:
    """LR as a function of the (fractional) epoch: linear warm-up, then constant, step or cosine.

    warm-up: ``warmup_lr -> lr`` over ``warmup_epochs``; step: times ``gamma`` at each milestone;
    cosine: ``lr -> 0`` from the end of warm-up to ``epochs``.
    """

    lr: float
    epochs: float
    kind: str = "constant"  # constant | step | cosine
    warmup_epochs: float = 0.0
    warmup_lr: float | None = None
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def __call__(self, epoch: float) -> float:
        # The job's progress a rank estimates (``--budget job``: its step plus the last
        # round's offset) can be below 0 early on, for a worker's step claimed before the
        # round that told it a peer lags: the schedule starts at 0 (0/0 was a NaN rate).
        epoch = max(float(epoch), 0.0)
        if epoch < self.warmup_epochs:
            start = self.lr * 0.1 if self.warmup_lr is None else self.warmup_lr
            return start + (self.lr - start) * epoch / self.warmup_epochs
        if self.kind == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-12)
            t = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
            return 0.5 * self.lr * (1 + math.cos(math.pi * t))
        return self.lr
