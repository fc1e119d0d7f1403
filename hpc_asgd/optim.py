"""The inner optimizers of the rank's own steps, on a flat parameter buffer, and LR schedules.

One fused update over the whole ``(n_params,)`` buffer instead of a loop over tensors. An
optimizer here gives the DIRECTION ``d`` of ``p -= lr * d`` and leaves the write to the update
rule (``hpc_asgd.rules``), which decides how W workers share the parameters. Their state is
private to its owner: under shared-memory updates every worker keeps its own (HOGWILD!'s
convention); across ranks, each rank keeps its local state (K-AVG's local momentum).

- :class:`FlatSGD`, torch.optim.SGD's arithmetic (dampening 0):
  ``d = g + wd * p;  buf = m * buf + d;  d = d + m * buf (Nesterov) or buf``
- :class:`FlatAdamW`, torch.optim.AdamW's (Loshchilov & Hutter, ICLR 2019; decoupled weight
  decay): ``m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
  d = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from hpc_asgd.errors import ConfigError


class FlatOptimizer(Protocol):
    """The direction of a step on a flat ``(n_params,)`` buffer, with private state."""

    def direction(
        self, params: torch.Tensor, grad: torch.Tensor, block: slice | None = None
    ) -> torch.Tensor:
        """The step ``d`` of ``params -= lr * d``; ``grad`` may be overwritten. With ``block``
        (a partial step), ``d`` covers only ``params[block]`` and only that slice of the
        state moves."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FlatSGD:
    def __init__(self, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {weight_decay}")
        if nesterov and not momentum:
            raise ConfigError("nesterov: needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buf: torch.Tensor | None = None  # (n_params,) momentum, made on the first step

    def direction(
        self, params: torch.Tensor, grad: torch.Tensor, block: slice | None = None
    ) -> torch.Tensor:
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


class FlatAdamW:
    """AdamW on a flat buffer. Bias correction counts the steps that moved each element: a
    partial step (``block``, LPP-SGD's) moves only its block's moments, so the block keeps a
    count of its own on top of the full steps' (blocks never overlap: one per worker)."""

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"adam_betas: two numbers in [0, 1), got {tuple(betas)}")
        if not eps > 0:
            raise ConfigError(f"adam_eps: must be positive, got {eps}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {weight_decay}")
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = eps, weight_decay
        self.m: torch.Tensor | None = None  # (n_params,) first moment, made on the first step
        self.v: torch.Tensor | None = None  # (n_params,) second moment
        self.t = 0  # full steps taken
        self.t_block: dict[tuple[int, int], int] = {}  # (start, stop) -> partial steps of it

    def direction(
        self, params: torch.Tensor, grad: torch.Tensor, block: slice | None = None
    ) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        m, v = self.m, self.v
        if block is None:
            self.t += 1
            counted = [(slice(0, grad.numel()), self.t)]
            counted += [(slice(a, b), self.t + n) for (a, b), n in self.t_block.items()]
        else:
            key = (int(block.start), int(block.stop))
            self.t_block[key] = self.t_block.get(key, 0) + 1
            params, grad, m, v = params[block], grad[block], m[block], v[block]
            counted = [(slice(0, grad.numel()), self.t + self.t_block[key])]
        m.lerp_(grad, 1 - self.b1)
        v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        d = grad  # overwritten: (m / bc1) / (sqrt(v / bc2) + eps), region by region
        for sl, t in counted:
            bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
            denom = v[sl].sqrt().div_(math.sqrt(bc2)).add_(self.eps)
            d[sl].copy_(m[sl]).div_(denom).div_(bc1)
        if self.weight_decay:
            d.add_(params, alpha=self.weight_decay)
        return d

    def state_dict(self) -> dict:
        blocks = [[a, b, n] for (a, b), n in self.t_block.items()]
        return {"m": self.m, "v": self.v, "t": self.t, "t_block": blocks}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.t = state["m"], state["v"], int(state["t"])
        self.t_block = {(int(a), int(b)): int(n) for a, b, n in state["t_block"]}


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
