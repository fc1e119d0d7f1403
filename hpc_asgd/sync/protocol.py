"""The synchroniser seam: what happens across ranks around the node's steps.

A synchroniser sees the flat model (``FlatModel``), the update rule that owns the parameters
and a ``Comm``; it never sees the engine, the data or the process layout. Its driver calls,
in node-step order and identically on every rank (through ``sync.clock``, the rounds' clock):

    start()                       once (construction): every rank takes rank 0's model
    grads_ready(step)             after backward, before the update (synchronous SGD only)
    next_stop(step)               the node step of the next blocking round (None: no more)
    step_done(stop)               at that node step; with workers, they are paused there
    poll(step)                    often, never blocking: drive non-blocking rounds (overlaps)
    nap_s()                       how long the averaging process may sleep before the next poll
    settle(step)                  (--keep-training) while this rank takes extra steps: one
                                  non-blocking look at the rounds; True once all finished
    finish(step)                  once, after this rank's last step: drain(step), the
                                  non-blocking rounds until every rank has finished, then
                                  final_average(), the exact average that gives consensus
    quiesce(step)                 before a checkpoint: complete every round in flight

Each algorithm is one file whose class is registered under its ``--algo`` name
(``@SYNCHRONIZERS.register``). The same class is the Python API's object for a training loop of
your own, over any ``nn.Module`` and ``torch.optim.Optimizer`` (see :class:`Averaging`). For
the application it also carries its adapter: how it is built from the configuration
(``from_config``), what it refuses (``validate``), whether a finished rank may keep training
(``keeps_training``); these read the application's configuration by field name, the library
never imports it. ``state_dict`` is what it checkpoints, ``metrics`` what it adds to the
summary, ``stats`` its figures as a dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from hpc_asgd.comm import Comm
from hpc_asgd.errors import ConfigError
from hpc_asgd.flat import FlatModel
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules.base import UpdateRule

if TYPE_CHECKING:  # the clock and the rounds know the protocol: no import cycle at run time
    from hpc_asgd.sync.clock import Clock
    from hpc_asgd.sync.rounds import Budget


class Synchronizer(Protocol):
    name: str  # the --algo value it is registered under
    keep_training: str | None  # how to ask for --keep-training with it (None: it cannot)
    promises_consensus: bool
    averages_gradients: bool  # True: needs grads_ready after every backward (W = 1 only)
    overlaps: bool  # True: rounds run in the background, driven by poll
    needs_workers: bool  # True: the CLI runs it with worker processes (its main process averages)
    outer_step: bool  # True: an outer optimizer may step its (global) rounds
    comm: Comm
    flat: FlatModel
    rule: UpdateRule
    clock: Clock
    budget: Budget  # the job's budget, as the rounds report it (``--budget job``, time budget)
    rounds: int  # averaging (or gradient-averaging) rounds done
    last_round: int  # node step of the last blocking round (0: none yet)
    wait_s: float  # seconds the node spent blocked in this synchroniser's collectives

    @property
    def inflight_s(self) -> float:
        """Seconds collectives were in flight (= wait_s when blocking)."""
        ...

    @classmethod
    def from_config(
        cls, cfg: Any, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> Synchronizer:
        """Built on every rank from the application's configuration (collective: it may split
        communicators)."""
        ...

    @classmethod
    def validate(cls, cfg: Any, world_size: int, local_size: int) -> None:
        """Its own rules on the configuration (ConfigError), checked before any collective."""
        ...

    @classmethod
    def keeps_training(cls, cfg: Any) -> bool:
        """Whether ``--keep-training`` may be used with this configuration of it (False, or
        a ConfigError that says more)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """Extra summary fields; collective (every rank calls it, in the same order)."""
        ...

    def stats(self) -> dict[str, Any]:
        """This rank's figures of the rounds (no collective)."""
        ...

    def start(self) -> None: ...

    def grads_ready(self, step: int) -> None: ...

    def next_stop(self, step: int) -> int | None: ...

    def step_done(self, step: int) -> None: ...

    def poll(self, step: int) -> None: ...

    def nap_s(self) -> float: ...

    def drain(self, step: int) -> None: ...

    def settle(self, step: int) -> bool: ...

    def final_average(self) -> None: ...

    def finish(self, step: int | None = None) -> None: ...

    def quiesce(self, step: int | None = None) -> None: ...


def keep_training_refused(algo: str, detail: str = "") -> ConfigError:
    """The error for ``--keep-training`` with an algorithm (or a mode of it) that cannot."""
    able = [c.keep_training for _, c in SYNCHRONIZERS.items() if c.keep_training]
    return ConfigError(
        f"keep_training: only the non-blocking algorithms ({', '.join(able)}) let a rank "
        f"train on while others finish; not {algo!r}{detail}"
    )
