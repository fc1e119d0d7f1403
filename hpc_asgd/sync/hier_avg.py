"""``--algo hier-avg``: hierarchical averaging (Zhou & Cong, arXiv 1903.05133).

Ranks form groups of S consecutive ranks (``--group-size``), i.e. groups ``[0..S-1],
[S..2S-1], ...``; by default, the ranks of one node (by host name). Every K1 local steps each
group averages its models on its sub-communicator; every K1*K2 steps all ranks average instead.
S = 1 is K-AVG with K = K1*K2; K1 = K2 = 1 is synchronous averaging every step. The summary
lists the groups (``groups``, world ranks).

``--hier-mode blocking`` (the paper): the rounds block the node (workers paused).
``--hier-mode nonblocking``: each level runs LASGD-style rounds in the background (snapshot,
allreduce while training goes on, add ``mean - snapshot``), at most one in flight per level.

In a loop of your own: ``hpc_asgd.HierAvg(model, opt, comm, group_size=S, local_period=K1,
global_period=K2, nonblocking=False)``, the counterpart of torch's ``HierarchicalModelAverager``
(parameters only, blocking) with BatchNorm statistics averaged and a non-blocking mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpc_asgd.comm import Comm
from hpc_asgd.errors import ConfigError
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.base import Averaging, outer_args
from hpc_asgd.sync.outer import outer_of
from hpc_asgd.sync.protocol import keep_training_refused
from hpc_asgd.sync.rounds import AsyncRound, drain_all, settle_all


def make_group(comm: Comm, group_size: int) -> Comm:
    """The averaging group of this rank: consecutive ranks, or the node when S = 0."""
    if group_size:
        return comm.split(comm.rank // group_size, comm.rank)
    return comm.split_node()


@SYNCHRONIZERS.register("hier-avg")
class HierAvg(Averaging):
    keep_training = "hier-avg --hier-mode nonblocking"
    outer_step = True

    @classmethod
    def from_config(
        cls, cfg: Any, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> HierAvg:
        s = cfg.sync
        return cls(
            flat, None, comm, rule=rule, group_size=s.group_size, local_period=s.local_period,
            global_period=s.global_period, nonblocking=s.hier_mode == "nonblocking",
            **outer_args(cfg),
        )  # fmt: skip

    @classmethod
    def validate(cls, cfg: Any, world_size: int, local_size: int) -> None:
        size = cfg.sync.group_size or local_size
        if world_size % size:
            raise ConfigError(
                f"group_size: {size} does not divide the world size {world_size}"
                + ("" if cfg.sync.group_size else " (the default is the ranks of one node)")
            )

    @classmethod
    def keeps_training(cls, cfg: Any) -> bool:
        if cfg.sync.hier_mode != "nonblocking":
            raise keep_training_refused(cls.name, f" ({cfg.sync.hier_mode})")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "group_rounds": self.group_rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.group_rounds = state.get("group_rounds", 0)
        if self.overlaps:  # the non-blocking schedule goes on from the step, as after quiesce
            step = self.clock.step
            self.next_local, self.next_world = step + self.k1, step + self.k1 * self.k2

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "group_rounds": self.group_rounds, "group": self.members}

    def metrics(self) -> dict[str, Any]:
        # the world ranks each group averaged among; averaging_rounds counts the global rounds
        return {"groups": self.groups(), "group_rounds": self.group_rounds}

    def __init__(
        self,
        model: nn.Module | FlatModel,
        optimizer: torch.optim.Optimizer | None = None,
        comm: Comm | None = None,
        *,
        local_period: int,
        global_period: int,
        group_size: int = 0,
        group: Comm | None = None,
        nonblocking: bool = False,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_nesterov: bool = False,
        **kw: Any,
    ):
        """``group_size`` S: consecutive ranks per group (0: the ranks of one node, by host
        name); ``group``: a sub-communicator of your own instead. ``local_period`` K1: node
        steps between group averages; ``global_period`` K2: group averages between global
        ones. ``nonblocking``: delta-corrected rounds in the background, one per level.
        ``outer_lr``, ``outer_momentum``, ``outer_nesterov``: the global level's outer
        optimizer (``hpc_asgd.sync.outer``); the group level averages plainly."""
        for name, k in (("local_period", local_period), ("global_period", global_period)):
            if not (isinstance(k, int) and k >= 1):
                raise ConfigError(f"{name}: must be a positive whole number, got {k!r}")
        if not (isinstance(group_size, int) and group_size >= 0):
            raise ConfigError(f"group_size: must be a whole number >= 0, got {group_size!r}")
        self.k1, self.k2 = local_period, global_period
        self.group_rounds = 0
        self.overlaps = nonblocking
        kw["outer"] = outer_of(outer_lr, outer_momentum, outer_nesterov)
        super().__init__(model, optimizer, comm, **kw)
        if group is None and group_size and self.comm.size % group_size:
            raise ConfigError(
                f"group_size: {group_size} does not divide the world size {self.comm.size}"
            )
        self.group = group if group is not None else make_group(self.comm, group_size)
        if nonblocking:
            self.local = AsyncRound(self.group, self.flat, self.rule)
            world = self.comm.split(0, self.comm.rank)
            self.world = AsyncRound(
                world, self.flat, self.rule, self.budget, self.outer, self.payload
            )
            self.next_local, self.next_world = self.k1, self.k1 * self.k2

    @property
    def members(self) -> list[int]:
        """The world ranks of this rank's group, the ranks it averages with every K1 steps."""
        return list(self.group.world_ranks)

    def groups(self) -> list[list[int]]:
        """Every group, as lists of world ranks ordered by their first rank (for the summary:
        with S = 0 they are the nodes). Collective over the world: each rank gives its group's
        first member, which names the group."""
        first = self.comm.allgather(torch.tensor([min(self.members)], dtype=torch.int64))
        out: dict[int, list[int]] = {}
        for r, f in zip(self.comm.world_ranks, first[:, 0].tolist(), strict=True):
            out.setdefault(f, []).append(r)
        return [out[f] for f in sorted(out)]

    # ---- blocking (the paper) --------------------------------------------------------------
    def next_stop(self, step: int) -> int | None:
        return None if self.overlaps else step + self.k1

    def step_done(self, step: int) -> None:
        if step % (self.k1 * self.k2) == 0:
            self.global_round_()
            self.rounds += 1
            self.last_round = step  # every rank's steps are in every model from here
        else:
            self.average_model_(self.group)
            self.group_rounds += 1

    # ---- non-blocking (delta correction) ---------------------------------------------------
    def poll(self, step: int) -> None:
        for r in (self.local, self.world):
            if r.busy and r.test():
                r.apply()
            elif r.busy:
                r.overdue()
        self.rounds, self.group_rounds = self.world.rounds, self.local.rounds
        if step >= self.next_world and not self.world.busy:
            self.world.start(finished=False, step=step)
            self.next_world = step + self.k1 * self.k2
            self.next_local = step + self.k1
        elif step >= self.next_local and not self.local.busy:
            self.local.start(finished=False, step=step)
            self.next_local = step + self.k1

    def drain(self, step: int) -> None:
        if not self.overlaps:
            return
        self.wait_s += drain_all([self.local, self.world], step)
        self.rounds, self.group_rounds = self.world.rounds, self.local.rounds

    def settle(self, step: int) -> bool:
        if not self.overlaps:
            return True
        over = settle_all([self.local, self.world], step)
        self.rounds, self.group_rounds = self.world.rounds, self.local.rounds
        return over

    def quiesce(self, step: int | None = None) -> None:
        step = self.clock.step if step is None else step
        if self.overlaps:
            self.drain(step)
            self.next_local, self.next_world = step + self.k1, step + self.k1 * self.k2

    @property
    def inflight_s(self) -> float:
        if not self.overlaps:
            return self.wait_s
        return self.local.inflight_s + self.world.inflight_s
