"""The synchroniser seam: what happens across ranks around the node's steps.

A synchroniser sees the flat model (``FlatModel``), the update rule that owns the parameters
and a ``Comm``; it never sees the engine, the data or the process layout. The driver calls,
in node-step order and identically on every rank:

    start()                       once: every rank takes rank 0's initial model
    grads_ready(step)             after backward, before the update (synchronous SGD only)
    next_stop(step, epoch)        the node step of the next blocking round (None: no more)
    step_done(stop, epoch)        at that node step; with workers, they are paused there
    poll(step, epoch)             often, never blocking: drive non-blocking rounds (overlaps)
    nap_s()                       how long the averaging process may sleep before the next poll
    drain(step)                   after this rank's last step: finish the non-blocking rounds
    settle(step)                  (--keep-training) instead of drain, while this rank takes
                                  extra steps: one non-blocking look; True once all finished
    finish()                      once, after the last step: final exact average (consensus)
    quiesce(step)                 before a checkpoint: complete every round in flight

Each algorithm is one file whose class is registered under its ``--algo`` name
(``@SYNCHRONIZERS.register``) and says how it is built from the configuration
(``from_config``), what it refuses (``validate``), whether a finished rank may keep training
(``keep_training``), what it checkpoints (``state_dict``) and what it adds to the summary
(``metrics``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from hpc_asgd.comm import Comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.sync.rounds import Budget

if TYPE_CHECKING:
    from hpc_asgd.config import Config


class Synchronizer(Protocol):
    name: str  # the --algo value it is registered under
    keep_training: str | None  # how to ask for --keep-training with it (None: it cannot)
    promises_consensus: bool
    averages_gradients: bool  # True: needs grads_ready after every backward (W = 1 only)
    overlaps: bool  # True: rounds run in the background, driven by poll
    needs_workers: bool  # True: the rank's main process must be free to average (spawn)
    budget: Budget  # the job's budget, as the rounds report it (``--budget job``, time budget)
    rounds: int  # averaging (or gradient-averaging) rounds done
    wait_s: float  # seconds the node spent blocked in this synchroniser's collectives
    inflight_s: float  # seconds collectives were in flight (= wait_s when blocking)

    @classmethod
    def from_config(
        cls, cfg: Config, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> Synchronizer:
        """Built on every rank (collective: it may split communicators)."""
        ...

    @classmethod
    def validate(cls, cfg: Config, world_size: int, local_size: int) -> None:
        """Its own configuration rules (ConfigError), checked before any collective."""
        ...

    @classmethod
    def keeps_training(cls, cfg: Config) -> bool:
        """Whether ``--keep-training`` may be used with this configuration of it (False, or
        a ConfigError that says more)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """Extra summary fields; collective (every rank calls it, in the same order)."""
        ...

    def start(self) -> None: ...

    def grads_ready(self, step: int) -> None: ...

    def next_stop(self, step: int, epoch: float) -> int | None: ...

    def step_done(self, step: int, epoch: float) -> None: ...

    def poll(self, step: int, epoch: float) -> None: ...

    def nap_s(self) -> float: ...

    def drain(self, step: int) -> None: ...

    def settle(self, step: int) -> bool: ...

    def finish(self) -> None: ...

    def quiesce(self, step: int) -> None: ...


class Averaging:
    """Shared plumbing: a comm, the model, timers and the exact averages every algorithm uses."""

    name = ""
    keep_training: str | None = None
    promises_consensus = True
    averages_gradients = False
    overlaps = False
    needs_workers = False

    def __init__(self, comm: Comm, flat: FlatModel, rule: UpdateRule):
        self.comm, self.flat, self.rule = comm, flat, rule
        self.budget = Budget()  # carried by the world stream's rounds, if the algorithm has one
        self.rounds = 0
        self.wait_s = 0.0

    @classmethod
    def from_config(
        cls, cfg: Config, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> Averaging:
        return cls(comm, flat, rule)

    @classmethod
    def validate(cls, cfg: Config, world_size: int, local_size: int) -> None:
        return None

    def nap_s(self) -> float:
        """Seconds the process driving :meth:`poll` (with workers: the rank's main process)
        may sleep before the next call: 1 ms while rounds overlap the steps (their progress
        needs the calls), no bound otherwise."""
        return 1e-3 if self.overlaps else float("inf")

    @classmethod
    def keeps_training(cls, cfg: Config) -> bool:
        return cls.keep_training is not None

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]

    def metrics(self) -> dict[str, Any]:
        return {}

    def average_(self, t: torch.Tensor, comm: Comm | None = None) -> None:
        """``t <- mean over the ranks of comm of t``, blocking; counts the time waited."""
        comm = comm or self.comm
        if comm.size == 1:
            return
        t0 = time.perf_counter()
        comm.allreduce_(t)
        t.div_(comm.size)
        self.wait_s += time.perf_counter() - t0

    def average_model_(self, comm: Comm | None = None) -> None:
        """Blocking model average (parameters and buffers, one collective), workers paused.
        A rule that keeps its own versions (Leashed-SGD) hands its latest one over first and
        takes the average back as a new version."""
        self.rule.publish()
        self.average_(self.flat.data, comm)
        self.rule.load(self.flat.params)

    def start(self) -> None:
        self.comm.bcast_(self.flat.data, root=0)
        self.rule.load(self.flat.params)

    def grads_ready(self, step: int) -> None:
        return None

    def next_stop(self, step: int, epoch: float) -> int | None:
        return None

    def poll(self, step: int, epoch: float) -> None:
        return None

    def drain(self, step: int) -> None:
        return None

    def settle(self, step: int) -> bool:
        """This rank has taken its scheduled steps and takes extra ones (now at node step
        ``step``) while it still owes rounds to slower ranks: one non-blocking look at them.
        True once every rank has finished; :meth:`drain` then returns at once."""
        return True

    def quiesce(self, step: int) -> None:
        """Complete every round in flight, on every rank (before a checkpoint)."""
        return

    @property
    def inflight_s(self) -> float:
        return self.wait_s  # blocking rounds: in flight exactly while the node waits

    def step_done(self, step: int, epoch: float) -> None:
        return None

    def finish(self) -> None:
        """Average parameters and buffers exactly once more, then take rank 0's bits: an
        allreduce alone may round differently on different ranks (recursive doubling)."""
        self.rule.publish()
        if not self.promises_consensus or self.comm.size == 1:
            return
        self.average_(self.flat.data)
        self.comm.bcast_(self.flat.data, root=0)


class Periodic(Averaging):
    """A round every K (``--period``) local node steps; K = 1 while the epoch is below E0
    (``--post-local-epochs``: post-local SGD, Lin et al., ICLR 2020)."""

    def __init__(
        self,
        comm: Comm,
        flat: FlatModel,
        rule: UpdateRule,
        period: int,
        post_local_epochs: float = 0.0,
    ):
        super().__init__(comm, flat, rule)
        self.period, self.post_local_epochs = period, post_local_epochs

    @classmethod
    def from_config(
        cls, cfg: Config, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> Periodic:
        return cls(comm, flat, rule, cfg.sync.period, cfg.sync.post_local_epochs)

    def period_at(self, epoch: float) -> int:
        """K at ``epoch``: the node steps from a round to the next."""
        return 1 if epoch < self.post_local_epochs else self.period
