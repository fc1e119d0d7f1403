"""One SGD step at node step ``s``, the same in the rank's own process and in its workers.

Node steps number the rank's passes over its shard: step ``s`` takes batch ``s % spe`` of the
epoch-``s // spe`` order, whichever worker claims it, so "epoch" means a node-wide pass (as in
the LPP-SGD reference code) and the LR schedule follows the node's progress.

A :class:`StepSpec` says how a rank's steps are made, in plain picklable parts (the training
split, the loss, an inner-optimizer factory, the LR schedule, the injected delays); each
process that steps, the rank's own or each of its W workers, makes its :class:`Stepper` from
it, with private optimizer state and augmentation stream.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from hpc_asgd.delays import Delays
from hpc_asgd.env import Fault
from hpc_asgd.flat import FlatModel
from hpc_asgd.optim import FlatOptimizer
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.shard import ShardSampler, Split
from hpc_asgd.stats import (
    APPLIED,
    CPU_S,
    DROPPED,
    LOCK_WAIT,
    LOSS_SUM,
    NF_FIRST,
    NF_LAST,
    NONFINITE,
    STALE0,
    STEP_T0,
    STEP_T_SUM,
    STEPS,
    TRIES0,
    bin_of,
    step_bin,
)

# loss(output, target) -> the batch's mean loss, a scalar tensor (F.cross_entropy's shape)
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def augment_seed(seed: int, rank: int, worker: int) -> int:
    """Augmentation draws differ per rank and worker; worker 0 matches the in-process path."""
    return seed * 7919 + rank + 104_729 * worker


@dataclass
class StepSpec:
    """How one rank's steps are made; picklable, so that its workers receive it whole (the
    split's tensors travel as shared memory, the callables by reference: the workers import
    their modules themselves)."""

    train: Split
    batch_size: int
    seed: int  # the data order (every rank's), and the augmentation streams (per rank, worker)
    rank: int
    world: int
    loss: Loss
    optimizer: Callable[[], FlatOptimizer]  # a fresh optimizer: private state per process
    schedule: Callable[[float], float]  # epoch (fractional, the node's or job's) -> lr
    delays: Delays | None = None  # worker 0's; each worker draws its own (``for_worker``)
    slow: float = 1.0  # straggler injection: each step takes ``slow`` times as long
    fault: Fault | None = None  # fault injection (tests): see :func:`inject`
    # After the job shrank (--min-ranks, :meth:`resharded`): the (rank, world) whose shard the
    # steps draw from (``rank`` and ``world`` stay the first ones: the augmentation streams
    # and the faults are the process's), and node step -> position in that shard's epochs
    # (``shift``) and in the LR schedule's (``lr_shift``, where the job's budget does not
    # place it through ``offset``).
    shard: tuple[int, int] | None = None
    shift: int = 0
    lr_shift: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        if not self.slow >= 1:
            raise ValueError(f"slow: a step's slow-down factor must be >= 1, got {self.slow}")

    def sampler(self) -> ShardSampler:
        rank, world = self.shard or (self.rank, self.world)
        return ShardSampler(len(self.train), rank, world, self.batch_size, self.seed)

    def resharded(self, rank: int, world: int, step: int, job_budget: bool) -> StepSpec:
        """From node step ``step`` on, draw from shard ``rank`` of ``world`` (the job shrank:
        fewer, larger shards), at the same point of the epochs: the data order and the LR
        schedule go on where the job was, in the new shard's steps per epoch. ``job_budget``:
        the rounds' ``offset`` places the LR schedule (it is recomputed for the new world)."""
        return self.placed(rank, world, step, self.epochs_at(step), job_budget)

    def epochs_at(self, step: int) -> float:
        """Epochs into the data at node step ``step`` (a replacement starts there)."""
        return (step + self.shift) / self.sampler().steps_per_epoch

    def placed(self, rank: int, world: int, step: int, at: float, job_budget: bool) -> StepSpec:
        """Shard ``rank`` of ``world``, node step ``step`` at ``at`` epochs into the data."""
        new = replace(self, shard=(rank, world))
        shift = round(at * new.sampler().steps_per_epoch) - step
        return replace(new, shift=shift, lr_shift=0 if job_budget else shift)

    def stepper(
        self,
        flat: FlatModel,
        rule: UpdateRule,
        stats: torch.Tensor,
        device: torch.device,
        worker: int = 0,
        grads_hook: Callable[[int], None] | None = None,
    ) -> Stepper:
        """The stepper of worker ``worker`` (0: the rank's own process) over ``flat``."""
        gen = torch.Generator().manual_seed(augment_seed(self.seed, self.rank, worker))
        delays = None if self.delays is None else self.delays.for_worker(worker)
        return Stepper(
            self, flat, rule, self.sampler(), gen, device, stats, delays, grads_hook
        )  # fmt: skip


class Stepper:
    """Takes node steps: batch, forward, loss, backward, the optimizer's direction, the update
    rule's write; counts them in this process's row of the stats table."""

    def __init__(
        self,
        spec: StepSpec,
        flat: FlatModel,
        rule: UpdateRule,
        sampler: ShardSampler,
        gen: torch.Generator,
        device: torch.device,
        stats: torch.Tensor,
        delays: Delays | None = None,
        grads_hook: Callable[[int], None] | None = None,
    ):
        self.train, self.loss, self.flat, self.rule, self.sampler = (
            spec.train, spec.loss, flat, rule, sampler,
        )  # fmt: skip
        self.gen, self.device = gen, device
        self.stats = stats.numpy()  # this worker's row; numpy: element updates cost ~100 ns
        self.opt = spec.optimizer()  # private state (momentum, moments)
        self.sched = spec.schedule
        self.spe = sampler.steps_per_epoch
        self.grads_hook = grads_hook  # synchronous SGD averages gradients here
        self.slow, self.fault, self.rank = spec.slow, spec.fault, spec.rank
        self.delays = delays  # random delays and the one-off pause (hpc_asgd.delays)
        self.block: slice | None = None  # the last step's block (partial backprop)
        # (1,) float64, shared: the job's progress minus this rank's node step (--budget job;
        # set by the rounds), so that the LR schedule follows the job, not this rank
        self.offset = np.zeros(1)
        self.t_hook = 0.0  # the last step's seconds in sync's gradient allreduce
        self.epoch_cached = -1
        self.batches: list[torch.Tensor] = []
        self.shift, self.lr_shift = spec.shift, spec.lr_shift  # see StepSpec.resharded

    def reshard(self, spec: StepSpec) -> None:
        """Draw from ``spec``'s shard from now on (:meth:`StepSpec.resharded`); this
        stepper's optimizer state and augmentation stream go on."""
        self.sampler = spec.sampler()
        self.spe = self.sampler.steps_per_epoch
        self.shift, self.lr_shift = spec.shift, spec.lr_shift
        self.epoch_cached = -1

    def step(self, s: int) -> bool:
        """Node step ``s``; False if it was skipped for a non-finite loss or gradient. The
        injected delays (``--delay``, the pause) follow the step's work; its CPU time is
        counted in the stats row. A fault injected at this step (tests) fires first."""
        poison = inject(self.fault, self.rank, s)  # the NaN fault: a NaN loss
        c0, t0 = time.process_time(), time.perf_counter()
        ok = self._step(s, poison)
        self.stats[CPU_S] += time.process_time() - c0
        if self.delays is not None:
            self.delays.after(s)
        t = time.perf_counter() - t0 - self.t_hook  # the step's own time: no allreduce wait
        self.stats[STEP_T_SUM] += t
        self.stats[STEP_T0 + step_bin(t)] += 1
        return ok

    def _step(self, s: int, poison: bool) -> bool:
        t0 = time.perf_counter()
        e, i = divmod(s + self.shift, self.spe)
        if e != self.epoch_cached:
            self.batches, self.epoch_cached = self.sampler.epoch(e), e
        x, y = self.train.batch(self.batches[i], train=True, gen=self.gen)
        if self.device.type != "cpu":  # (two no-op calls cost 4 us a step on CPU)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        p = self.rule.read()
        self.flat.bind_params(p)
        block = self.rule.block_for((s + self.shift) / self.spe)
        if block is not None or self.block is not None:  # changed: (un)freeze parameters
            self.flat.only_grads_for(block)
        self.block = block
        loss = self.loss(self.flat.module(x), y)
        if poison:
            loss = loss * math.nan
        self.flat.zero_grad()
        loss.backward()
        value = loss.detach().item()
        grad = self.flat.grad
        if not math.isfinite(value):  # a NaN gradient is what every rank's sum then agrees on
            grad.fill_(math.nan)
        t_hook = 0.0  # seconds in the gradient allreduce: not this step's own work
        if self.grads_hook is not None:
            t_hook = time.perf_counter()
            self.grads_hook(s + 1)  # sync: the gradient is now every rank's mean
            t_hook = time.perf_counter() - t_hook
        self.t_hook = t_hook
        row = self.stats
        row[STEPS] += 1
        # A non-finite step is skipped before it reaches the optimizer or the model. The test
        # is one reduction over the gradient, (n_params,): its sum is NaN or infinite when an
        # element is (a finite sum overflows only for gradients near float32's limit, which
        # is divergence too); isfinite().all() measured 30x slower (0.3 ms for 118k
        # parameters, a bool tensor of n elements). Under sync the test is on the averaged
        # gradient, identical on every rank: all skip together.
        if not math.isfinite(float((grad if block is None else grad[block]).sum())):
            row[NONFINITE] += 1
            row[NF_FIRST] = row[NF_FIRST] or s + 1
            row[NF_LAST] = s + 1
            return False
        d = self.opt.direction(p, grad, block)
        res = self.rule.apply(d, self.sched((s + self.offset[0] + self.lr_shift) / self.spe), block)
        row[APPLIED if res.applied else DROPPED] += 1
        row[LOCK_WAIT] += res.lock_wait_s
        row[LOSS_SUM] += value
        row[STALE0 + bin_of(res.staleness)] += 1
        row[TRIES0 + bin_of(res.tries - 1)] += 1
        if self.slow > 1:  # sleep in proportion to the step's own work, not its comm wait
            time.sleep((self.slow - 1) * (time.perf_counter() - t0 - t_hook))
        return True


def inject(fault: Fault | None, rank: int, step: int) -> bool:
    """Fault injection for the failure tests (``HPC_ASGD_FAULT``, read by env.py); True: the
    step must be poisoned (NaN loss)."""
    if fault is None or fault.rank != rank or fault.step != step:
        return False
    if fault.kind == "nan":
        return True
    if fault.kind == "stop":  # stop answering, as a hung node does; the peers' deadline fires
        os.kill(os.getpid(), signal.SIGSTOP)
        return False
    if fault.kind == "kill":  # die as the OOM killer does it
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "killgroup":  # the rank and every process of it: a node that dies
        os.killpg(os.getpgid(0), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step}")
