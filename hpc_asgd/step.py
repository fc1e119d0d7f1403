"""One SGD step at node step ``s``, the same in the rank's own process and in its workers.

Node steps number the rank's passes over its shard: step ``s`` takes batch ``s % spe`` of the
epoch-``s // spe`` order, whichever worker claims it, so "epoch" means a node-wide pass (as in
the LPP-SGD reference code) and the LR schedule follows the node's progress.
"""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F

from hpc_asgd.config import Config
from hpc_asgd.data import Dataset, ShardSampler
from hpc_asgd.delays import Delays
from hpc_asgd.env import Fault
from hpc_asgd.flat import FlatModel
from hpc_asgd.optim import FlatSGD, Schedule
from hpc_asgd.rules.base import UpdateRule
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


def schedule_of(cfg: Config) -> Schedule:
    o = cfg.optim
    return Schedule(
        o.lr,
        cfg.run.epochs,
        o.lr_schedule,
        o.warmup_epochs,
        o.warmup_lr,
        tuple(o.lr_milestones),
        o.lr_gamma,
    )


class Stepper:
    def __init__(
        self,
        cfg: Config,
        data: Dataset,
        flat: FlatModel,
        rule: UpdateRule,
        sampler: ShardSampler,
        gen: torch.Generator,
        device: torch.device,
        stats: torch.Tensor,
        grads_hook=None,
        slow: float = 1.0,
        worker: int = 0,
    ):
        o = cfg.optim
        self.data, self.flat, self.rule, self.sampler = data, flat, rule, sampler
        self.gen, self.device = gen, device
        self.stats = stats.numpy()  # this worker's row; numpy: element updates cost ~100 ns
        self.opt = FlatSGD(o.momentum, o.weight_decay, o.nesterov)  # private momentum
        self.sched = schedule_of(cfg)
        self.spe = sampler.steps_per_epoch
        self.grads_hook = grads_hook  # synchronous SGD averages gradients here
        self.slow = slow  # straggler injection: each step takes ``slow`` times as long
        # random delays and the one-off pause (hpc_asgd.delays); the sampler's shard is the rank
        self.delays = Delays.from_config(cfg, sampler.shard, worker)
        self.block: slice | None = None  # the last step's block (partial backprop)
        # (1,) float64, shared: the job's progress minus this rank's node step (--budget job;
        # set by the rounds), so that the LR schedule follows the job, not this rank
        self.offset = np.zeros(1)
        self.t_hook = 0.0  # the last step's seconds in sync's gradient allreduce
        self.epoch_cached = -1
        self.batches: list[torch.Tensor] = []

    def step(self, s: int, poison: bool = False) -> bool:
        """Node step ``s``; False if it was skipped for a non-finite loss or gradient.
        ``poison`` (fault injection) makes its loss NaN. The injected delays (``--delay``,
        the pause) follow the step's work; its CPU time is counted in the stats row."""
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
        e, i = divmod(s, self.spe)
        if e != self.epoch_cached:
            self.batches, self.epoch_cached = self.sampler.epoch(e), e
        x, y = self.data.train.batch(self.batches[i], train=True, gen=self.gen)
        if self.device.type != "cpu":  # (two no-op calls cost 4 us a step on CPU)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        p = self.rule.read()
        self.flat.bind_params(p)
        block = self.rule.block_for(s / self.spe)
        if block is not None or self.block is not None:  # changed: (un)freeze parameters
            self.flat.only_grads_for(block)
        self.block = block
        loss = F.cross_entropy(self.flat.module(x), y)
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
        # A non-finite step is skipped before it reaches the momentum or the model. The test
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
        res = self.rule.apply(d, self.sched((s + self.offset[0]) / self.spe), block)
        row[APPLIED if res.applied else DROPPED] += 1
        row[LOCK_WAIT] += res.lock_wait_s
        row[LOSS_SUM] += value
        row[STALE0 + bin_of(res.staleness)] += 1
        row[TRIES0 + bin_of(res.tries - 1)] += 1
        if self.slow > 1:  # sleep in proportion to the step's own work, not its comm wait
            time.sleep((self.slow - 1) * (time.perf_counter() - t0 - t_hook))
        return True


def slow_factor(cfg: Config, rank: int) -> float:
    """``--slow-factor`` on ``--slow-rank``, 1 elsewhere."""
    return cfg.run.slow_factor if cfg.run.slow_rank == rank else 1.0


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
    raise RuntimeError(f"injected fault at step {step}")
