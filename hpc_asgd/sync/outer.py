"""The outer optimizer of the averaging rounds: a round as an optimizer step on the pseudo-gradient.

Plain averaging replaces each rank's model by the mean. SlowMo (Wang, Tantia, Ballas, Rabbat,
ICLR 2020) and DiLoCo (Douillard et al., arXiv 2311.08105) treat the round as a step of an
outer optimizer instead: every rank keeps the last global model ``x_g`` (the parameters after
the previous round), and at a round, with ``mean`` the ranks' average,

    delta = x_g - mean                                   # the pseudo-gradient, (n_params,)
    v     = momentum * v + delta                         # (momentum 0: no v is kept)
    step  = delta + momentum * v  (Nesterov)  or  v
    x_g   = x_g - lr * step                              # the new global model

which is torch.optim.SGD's arithmetic (dampening 0) on ``x_g`` with gradient ``delta``. lr 1 and
momentum 0 give ``x_g = mean``: plain averaging, which the synchronisers then run exactly as
without an outer optimizer (no copy is kept). DiLoCo's setting is lr 0.7, momentum 0.9,
Nesterov; fairscale's SlowMo defaults are lr 1, momentum 0.5.

Only the parameters are stepped; BatchNorm statistics (the flat buffer's float buffers) are
averaged as before. Memory: ``x_g`` and, with momentum, ``v``: one or two extra copies of the
parameters per rank. Every rank computes the same step from the same mean (up to the rounding of
the allreduce on each rank), so ``x_g`` is the job's, not the rank's; the final exact average of
the run is taken of the live models, without an outer step, and gives consensus as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hpc_asgd.errors import ConfigError


class OuterSGD:
    def __init__(self, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = False):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"outer_lr: must be a positive number, got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ConfigError(f"outer_momentum: must be in [0, 1), got {momentum!r}")
        if nesterov and not momentum:
            raise ConfigError("outer_nesterov: needs outer_momentum > 0")
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self.x_g: torch.Tensor | None = None  # (n_params,) the last global model
        self.v: torch.Tensor | None = None  # (n_params,) the outer momentum

    @property
    def plain(self) -> bool:
        """lr 1 and momentum 0: the round is the plain average."""
        return self.lr == 1.0 and self.momentum == 0.0

    def start(self, params: torch.Tensor) -> None:
        """The global model starts as the common initial one (after the start's broadcast)."""
        self.x_g = params.detach().clone()
        self.v = torch.zeros_like(self.x_g) if self.momentum else None

    def step(self, mean: torch.Tensor) -> torch.Tensor:
        """One outer step from the ranks' mean parameters ``mean`` ``(n_params,)``; returns
        the new global model (this object's own tensor: copy it, do not keep it)."""
        assert self.x_g is not None, "start() first"
        if self.plain:  # (a compressed payload keeps x_g for plain averaging too)
            return self.x_g.copy_(mean)
        delta = self.x_g - mean  # the pseudo-gradient
        if self.v is not None:
            self.v.mul_(self.momentum).add_(delta)
            delta = delta.add_(self.v, alpha=self.momentum) if self.nesterov else self.v
        self.x_g.sub_(delta, alpha=self.lr)
        return self.x_g

    def state_dict(self) -> dict[str, Any]:
        return {"x_g": self.x_g, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x_g, self.v = state["x_g"], state["v"]


def outer_of(lr: float, momentum: float, nesterov: bool) -> OuterSGD | None:
    """The outer optimizer the arguments ask for; None for plain averaging (lr 1, no momentum)."""
    outer = OuterSGD(lr, momentum, nesterov)
    return None if outer.plain else outer
