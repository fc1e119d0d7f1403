"""The synchronisers' common base, :class:`Averaging`: the flat model, the rounds' arithmetic
(averages, the outer step, 16-bit payloads) and the Python API around a training loop (hooks on
the optimizer's step, ``iterate``, ``finish``, ``stats``, ``state_dict``). The seam it fills is
``hpc_asgd.sync.protocol``; :class:`~hpc_asgd.sync.periodic.Periodic` adds the round every K.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from hpc_asgd import comm as comms
from hpc_asgd.comm import Comm
from hpc_asgd.errors import ConfigError
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import InPlace, UpdateRule
from hpc_asgd.sync.clock import Clock
from hpc_asgd.sync.outer import OuterSGD
from hpc_asgd.sync.payload import Payload, payload_of
from hpc_asgd.sync.rounds import Budget


def same_model(comm: Comm, flat: FlatModel) -> None:
    """One small collective: every rank's model has the same tensors (shapes, in order) as
    rank 0's, else a ConfigError on every rank naming the ranks that differ."""
    shapes = repr([tuple(t.shape) for t in flat.tensors()]).encode()
    digest = int.from_bytes(hashlib.sha256(shapes).digest()[:7], "little")  # fits int64
    mine = torch.tensor([len(flat.tensors()), len(flat), digest], dtype=torch.int64)
    table = comm.allgather(mine)  # (ranks, 3): tensors, floats, shape digest
    differ = [r for r in range(comm.size) if not torch.equal(table[r], table[0])]
    if differ:
        who = ", ".join(
            f"rank {comm.world_ranks[r]} ({int(table[r, 0])} tensors, {int(table[r, 1])} floats)"
            for r in differ
        )
        raise ConfigError(
            f"model: {who} differ from rank 0's model ({int(table[0, 0])} tensors, "
            f"{int(table[0, 1])} floats, or the same counts in other shapes): build the same "
            "model on every rank"
        )


def check_optimizer(optimizer: Any, module: nn.Module) -> None:
    """The optimizer steps the model's own parameters (no copies, no other model's)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    mine = {id(p) for p in module.parameters()}
    theirs = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in mine for p in theirs)
    if foreign:
        raise ConfigError(
            f"optimizer: {foreign} of its {len(theirs)} parameters are not the model's; build "
            "it over model.parameters() (after moving the model to its device)"
        )


class Averaging:
    """Shared plumbing: a comm, the model, timers and the exact averages every algorithm uses;
    and the Python API, for a training loop of your own::

        comm = hpc_asgd.init()
        with hpc_asgd.LASGD(model, opt, comm, period=8) as avg:
            for x, y in avg.iterate(loader):
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        # every rank now holds the same bits

    ``model``: any ``nn.Module`` (float32 parameters; its parameters and floating buffers,
    BatchNorm statistics included, are re-pointed at ONE flat buffer, which the rounds
    average), or a ``FlatModel``. ``optimizer``: any ``torch.optim.Optimizer`` over the model's
    parameters, its state private to the rank; a hook on its ``step`` makes the rounds' calls
    after each step (without one, call :meth:`step` yourself). ``comm``: the communicator
    (default: :func:`hpc_asgd.init`'s). ``steps``: a budget of node steps per rank, for
    :meth:`should_stop` and :meth:`iterate` (the job's, summed over the ranks, with a
    non-blocking synchroniser); ``time_budget_s``: seconds from the first step (non-blocking
    synchronisers and :class:`NoSync` only). ``rule``: who writes the parameters (default
    :class:`~hpc_asgd.rules.InPlace`, the optimizer; the CLI passes its workers' rule).

    Construction is collective: every rank checks that all hold the same model (one small
    allgather), then takes rank 0's.
    """

    name = ""
    keep_training: str | None = None
    promises_consensus = True
    averages_gradients = False
    overlaps = False
    needs_workers = False
    outer_step = False  # takes an outer optimizer on its (global) rounds

    def __init__(
        self,
        model: nn.Module | FlatModel,
        optimizer: torch.optim.Optimizer | None = None,
        comm: Comm | None = None,
        *,
        rule: UpdateRule | None = None,
        steps: int = 0,
        time_budget_s: float = 0.0,
        outer: OuterSGD | None = None,
        avg_dtype: str = "fp32",
    ):
        if isinstance(model, FlatModel):
            self.flat = model
        elif isinstance(model, nn.Module):
            first = next(model.parameters(), None)
            self.flat = FlatModel(model, device=first.device if first is not None else "cpu")
        else:
            raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if self.flat.n_params == 0:
            raise ConfigError("model: it has no parameters to average")
        comm = comm if comm is not None else comms.current()
        if comm is None:
            raise ConfigError(f"comm: call hpc_asgd.init() first, or pass a Comm to {self.name}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ConfigError(f"steps: must be a whole number >= 0, got {steps!r}")
        if not time_budget_s >= 0:
            raise ConfigError(f"time_budget_s: must be >= 0, got {time_budget_s!r}")
        self.comm = comm
        self.rule: UpdateRule = rule if rule is not None else InPlace(self.flat.params)
        self.budget = Budget()  # carried by the world stream's rounds, if the algorithm has one
        self.clock = Clock(self, steps, time_budget_s)
        self.rounds = 0
        self.last_round = 0  # node step of the last blocking round (a shrunk job's credit)
        self.wait_s = 0.0
        self.outer = outer  # the rounds' outer optimizer (None: plain averaging)
        # the global rounds' parameters in 16 bits (None: float32; one rank has no rounds)
        self.payload: Payload | None = None
        if avg_dtype != "fp32" and comm.size > 1:
            if not self.outer_step:
                raise ConfigError(f"avg_dtype: {self.name!r} has no model-averaging rounds")
            self.payload = payload_of(avg_dtype, self.flat.n_params)
            self.outer = outer or OuterSGD()  # the payload is the change since x_g
        self._hooks: list[Any] = []
        self._finished = False
        if optimizer is not None:
            check_optimizer(optimizer, self.flat.module)
        self.start()
        if optimizer is not None:
            self.attach(optimizer)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank {self.comm.rank}/{self.comm.size}, "
            f"{self.flat.n_params} parameters, step {self.clock.step}, rounds {self.rounds})"
        )

    # ---- the application's adapter ---------------------------------------------------------
    @classmethod
    def from_config(
        cls, cfg: Any, comm: Comm, flat: FlatModel, rule: UpdateRule, steps_per_epoch: int
    ) -> Averaging:
        return cls(flat, None, comm, rule=rule)

    @classmethod
    def validate(cls, cfg: Any, world_size: int, local_size: int) -> None:
        return None

    @classmethod
    def keeps_training(cls, cfg: Any) -> bool:
        return cls.keep_training is not None

    # ---- in a training loop of your own (the Python API) -----------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook this synchroniser onto ``optimizer.step`` (the constructor does it when given
        one): after each step, :meth:`step`; before it, :meth:`reduce_gradients`."""
        check_optimizer(optimizer, self.flat.module)
        if self.averages_gradients:
            self._hooks.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._hooks.append(optimizer.register_step_post_hook(self._post_hook))

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        self.reduce_gradients()

    def _post_hook(self, optimizer, args, kwargs) -> None:
        self.step()

    def detach(self) -> None:
        """Remove the optimizer hooks (``finish`` does)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def reduce_gradients(self) -> None:
        """Between backward and the optimizer's step (its pre-hook calls it): synchronous SGD
        averages the gradients here; the others do nothing. ``zero_grad(set_to_none=True)``
        (torch's default) left the parameters gradients of their own: they are gathered
        into the flat gradient buffer first (a missing one counts as zeros)."""
        if self.averages_gradients:
            self.flat.gather_grads()
            self.grads_ready(self.clock.step + 1)

    def step(self) -> None:
        """After each optimizer step (its hook calls it): the round due at this node step,
        if a blocking one is, and one non-blocking look at the rounds in flight."""
        self.clock.tick()

    def should_stop(self) -> bool:
        """Whether this rank's budget (``steps``, ``time_budget_s``) is spent: stop stepping,
        then :meth:`finish` (on leaving the ``with`` block)."""
        return self.clock.should_stop()

    def iterate(self, batches: Iterable) -> Iterator:
        """The items of ``batches`` (a DataLoader, say), epoch after epoch, until
        :meth:`should_stop`; without a budget, one pass. Before each epoch it calls
        ``set_epoch(e)`` on the loader's ``sampler`` and ``batch_sampler`` where they have one
        (:class:`~hpc_asgd.ShardSampler`, ``DistributedSampler``), so each epoch reshuffles."""
        budget = bool(self.clock.steps or self.clock.time_budget_s)
        epoch = 0
        while True:
            for name in ("sampler", "batch_sampler"):
                sampler: Any = getattr(batches, name, None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
            n = 0
            for item in batches:
                if self.should_stop():
                    return
                n += 1
                yield item
            if not budget:
                return
            if n == 0:
                raise ConfigError("iterate: the loader yields no batch; the budget never ends")
            epoch += 1

    def finish(self, step: int | None = None) -> None:
        """After this rank's last step, on every rank (leaving the ``with`` block does it):
        drain the non-blocking rounds (a rank that has finished keeps joining its peers'
        rounds until every rank has), then the final exact average: every rank holds the
        same bits. ``step``: this rank's node steps (default: those the clock counted)."""
        if self._finished:
            return
        self.detach()
        self.drain(self.clock.step if step is None else step)
        self.final_average()
        self._finished = True

    def __enter__(self) -> Averaging:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.finish()
        else:  # an error on this rank: no collective (its peers may never come); hooks off
            self.detach()

    def stats(self) -> dict[str, Any]:
        """This rank's figures, as the CLI's summary reports them: node steps, rounds, the
        seconds training was blocked by communication (``comm_wait_s``), the seconds rounds
        were in flight (``comm_inflight_s``) and the share hidden (``comm_overlap``)."""
        inflight = self.inflight_s
        return {
            "algo": self.name,
            "steps": self.clock.step,
            "rounds": self.rounds,
            "comm_wait_s": self.wait_s,
            "comm_inflight_s": inflight,
            "comm_overlap": max(0.0, 1 - self.wait_s / inflight) if inflight > 0 else None,
            "budget_spent": self.budget.exhausted
            or bool(self.clock.limit and self.clock.step >= self.clock.limit),
        }

    # ---- the seam's defaults ---------------------------------------------------------------
    def nap_s(self) -> float:
        """Seconds the process driving :meth:`poll` (with workers: the rank's main process)
        may sleep before the next call: 1 ms while rounds overlap the steps (their progress
        needs the calls), no bound otherwise."""
        return 1e-3 if self.overlaps else float("inf")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to go on bitwise (no collective): the node step and the
        rounds' schedule. A non-blocking round in flight is not in it (its correction would
        be lost to a resumed run): :meth:`quiesce` completes it first, on every rank."""
        state: dict[str, Any] = {"step": self.clock.step, "rounds": self.rounds}
        if self.outer is not None:  # the global model and the outer momentum
            state["outer"] = self.outer.state_dict()
        if self.payload is not None:  # what the rounds have not sent yet
            state["payload"] = self.payload.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]
        if self.outer is not None and "outer" in state:
            self.outer.load_state_dict(state["outer"])
        if self.payload is not None and "payload" in state:
            self.payload.load_state_dict(state["payload"])
        self.clock.resume(int(state.get("step", 0)))
        self.clock.begun = False  # the budget counts again from there

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

    def global_round_(self) -> None:
        """A blocking round of all ranks: the model average, then the outer optimizer's step
        on it, if there is one (every rank goes on from the new global model; the buffers
        stay averaged)."""
        self.rule.publish()
        flat, outer, payload = self.flat, self.outer, self.payload
        if payload is None:
            self.average_(flat.data)
            if outer is not None:
                flat.params.copy_(outer.step(flat.params))
        else:  # the change since x_g in 16 bits, the buffers in float32 (a second call)
            assert outer is not None and outer.x_g is not None  # made with the payload
            t0 = time.perf_counter()
            self.comm.allreduce_(payload.pack(flat.params, outer.x_g))
            self.wait_s += time.perf_counter() - t0
            if flat.n_buffers:
                self.average_(flat.data[flat.n_params :])
            flat.params.copy_(outer.step(payload.mean(outer.x_g, self.comm.size)))
        self.rule.load(flat.params)

    def start(self) -> None:
        """Every rank takes rank 0's model (parameters and buffers), once all were found to
        hold the same one."""
        if self.comm.size > 1:
            same_model(self.comm, self.flat)
        self.comm.bcast_(self.flat.data, root=0)
        self.rule.load(self.flat.params)
        if self.outer is not None:
            self.outer.start(self.flat.params)

    def grads_ready(self, step: int) -> None:
        return None

    def next_stop(self, step: int) -> int | None:
        return None

    def step_done(self, step: int) -> None:
        return None

    def poll(self, step: int) -> None:
        return None

    def drain(self, step: int) -> None:
        return None

    def settle(self, step: int) -> bool:
        """This rank has taken its scheduled steps and takes extra ones (now at node step
        ``step``) while it still owes rounds to slower ranks: one non-blocking look at them.
        True once every rank has finished; :meth:`drain` then returns at once."""
        return True

    def quiesce(self, step: int | None = None) -> None:
        """Complete every round in flight, on every rank (before a checkpoint); ``step``:
        this rank's node steps (default: those the clock counted)."""
        return

    @property
    def inflight_s(self) -> float:
        return self.wait_s  # blocking rounds: in flight exactly while the node waits

    def final_average(self) -> None:
        """Average parameters and buffers exactly once more, then take rank 0's bits: an
        allreduce alone may round differently on different ranks (recursive doubling)."""
        self.rule.publish()
        if not self.promises_consensus or self.comm.size == 1:
            return
        self.average_(self.flat.data)
        self.comm.bcast_(self.flat.data, root=0)
        # the rule's latest version too (Leashed-SGD's): a later publish (the final
        # checkpoint's) must not bring back this rank's own model (measured: it did, and the
        # ranks' checksums differed, lasgd x leashed with checkpoints)
        self.rule.load(self.flat.params)


def outer_args(cfg: Any) -> dict[str, Any]:
    """The global rounds' arguments (outer optimizer, payload) from the application's
    configuration."""
    s = cfg.sync
    return {
        "outer_lr": s.outer_lr,
        "outer_momentum": s.outer_momentum,
        "outer_nesterov": s.outer_nesterov,
        "avg_dtype": s.avg_dtype,
    }
