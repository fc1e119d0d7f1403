"""What the CLI's two training loops share (``loops``: in process, with workers): the job's
parts (:class:`Job`) and one event schedule (:class:`Events`).

Every rank runs the same number of node steps and meets its peers at the same node steps in
the same order: the synchroniser's blocking rounds (its clock, the one the Python API's hook
drives too), the evaluations (whose sums over the ranks complete in the background) and the
checkpoint checks. :class:`Events` says which comes next; at a step holding several, the round
comes first, then the evaluation, then the check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hpc_asgd import metrics, signals
from hpc_asgd.checkpoint import Checkpointer
from hpc_asgd.comm import Comm
from hpc_asgd.config import Config
from hpc_asgd.data import Dataset
from hpc_asgd.env import Launch
from hpc_asgd.errors import Preempted
from hpc_asgd.evaluate import Evaluator
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import UpdateRule
from hpc_asgd.stats import CPU_S
from hpc_asgd.step import StepSpec
from hpc_asgd.sync import Synchronizer
from hpc_asgd.sync.rounds import Budget


@dataclass
class Tracker:
    """What a caller may want to know after a failure: the last node step this rank saw."""

    step: int | None = None


@dataclass
class Job:
    """The parts of one rank's run, built once by ``train.run``."""

    cfg: Config
    launch: Launch
    comm: Comm
    data: Dataset
    flat: FlatModel
    rule: UpdateRule
    sync: Synchronizer
    step: StepSpec  # how this rank's steps are made (its own process's, or each worker's)
    model: Callable[[], nn.Module]  # builds the model (workers, the evaluation copy)
    stats: torch.Tensor  # (W, NSTATS) float64
    total: int  # node steps
    spe: int  # node steps per epoch
    evals: list[int]  # node steps after which to evaluate; the last is ``total``
    evaluator: Evaluator
    device: torch.device
    rank_threads: int
    progress: metrics.Progress
    ck: Checkpointer
    resumed: dict | None  # the checkpoint this run resumes from
    tracker: Tracker
    spawn: bool = False  # W worker processes (else W = 1 steps in the rank's own process)
    # node steps taken minus ``total``: past it while the job's budget lasted (or, with
    # --keep-training, while slower ranks finished); negative: stopped short, the budget spent
    extra: int = 0
    t_start: float = 0.0  # perf_counter() when ``run`` began
    setup_s: float = 0.0  # from ``t_start`` to this rank's first training step (this session)
    launch_s: float = math.nan  # from this process's creation to its first training step
    run_s: float = 0.0  # from the first training step to the end of the final evaluation
    # CPU seconds of this (main) process from the first training step to the last, without its
    # evaluation passes: the averager's cost when workers train (``summary.json``)
    averager_cpu_s: float | None = None
    cpu_begin: float = 0.0  # process_time() at ``begin`` (this session)
    # --min-ranks: one row per shrink (``elastic.recover``), for summary.json's ``membership``
    membership: list[dict] = field(default_factory=list)
    world_size_start: int = 0  # the ranks the job started with
    total_start: int = 0  # the node steps per rank it was scheduled with

    @property
    def trains_on(self) -> bool:
        """Whether this rank trains past its scheduled steps: until the job's budget is spent
        (``--budget job``), or until the slowest rank finishes (``--keep-training``)."""
        return self.cfg.sync.keep_training or bool(self.sync.budget.steps)

    def trained_on(self, step: int) -> bool:
        """Past the scheduled steps, at node step ``step`` (one non-blocking look at the
        rounds): whether the job's budget is spent (``--budget job``) or, with
        ``--keep-training``, every rank has taken its own steps."""
        if self.sync.budget.steps:
            self.sync.poll(step)
            return self.sync.budget.spent(step)
        return self.sync.settle(step)

    def start_budget(self, start: int, train_before: float) -> Budget:
        """At the first step, ``start``: the budget counts from there."""
        self.sync.budget.begin(start, self.cfg.run.time_budget, train_before)
        return self.sync.budget

    def state(self, step: int, train_s: float, extra: dict | None = None) -> dict:
        """What a checkpoint holds (tensors and plain containers: ``weights_only``-safe)."""
        self.rule.publish()
        return {
            "step": step,
            "flat": self.flat.data.detach().cpu().clone(),
            "stats": self.stats.clone(),
            "train_s": train_s,
            "config": self.cfg.to_dict(),
            **self.evaluator.state_dict(),
            "sync": self.sync.state_dict(),
            **(extra or {}),
        }

    def load_state(self, state: dict) -> None:
        """Take back this rank's model, counters and metrics from a checkpoint."""
        self.flat.data.copy_(state["flat"])
        self.rule.load(self.flat.params)
        saved = state["stats"]  # (checkpoints from before the CPU column have one fewer)
        self.stats[:, : saved.shape[1]].copy_(saved)
        self.stats[:, CPU_S] = 0.0  # CPU seconds count this session's, as averager_cpu_s does
        self.evaluator.load_state_dict(state)
        self.sync.load_state_dict(state.get("sync", state))  # (earlier: at the top level)

    def begin(self, start: int) -> None:
        """Right before the first step: a USR1 during start-up (data, model, workers) ends
        every rank for a requeue (they agree on it first); nothing is lost or needs saving."""
        self.tracker.step = start
        self.cpu_begin = time.process_time() - self.evaluator.cpu_s
        self.launch_s = metrics.process_age_s()
        if self.ck.root is None or self.launch.joining:  # (a replacement joins running peers)
            return
        flag = torch.tensor([float(signals.usr1_seen())])
        self.comm.allreduce_(flag, op="max")
        if flag[0]:
            raise Preempted(start, saved=False)

    def end_training(self) -> None:
        """Right after the last training step (workers): the averager's CPU time."""
        self.averager_cpu_s = time.process_time() - self.evaluator.cpu_s - self.cpu_begin

    def checkpoint(self, step: int, train_s: float, halt: bool, extra: dict | None = None):
        """Save at ``step`` (collective; workers held), then stop for a requeue if ``halt``."""
        self.evaluator.complete(wait=True)  # their rows belong in the checkpoint
        self.sync.quiesce(step)
        self.ck.save(step, self.state(step, train_s, extra), self.launch.fault)
        self.flat.bind_params(self.flat.params)
        if halt:
            raise Preempted(step)


class Events:
    """The node steps at which a loop must act, identical on every rank, from ``start``
    (a resumed run replays the synchroniser's schedule of rounds up to it)."""

    def __init__(self, job: Job, start: int):
        self.clock, self.ck = job.sync.clock, job.ck
        self.clock.resume(start)  # its next blocking round
        self.evals = [e for e in job.evals if e > start]
        self.ck_at = self.ck.next_event(start)  # the next checkpoint check

    @property
    def next(self) -> int:
        """The next node step holding an event (workers are held there)."""
        due = (self.clock.stop, self.evals[0] if self.evals else None, self.ck_at)
        return min(x for x in due if x is not None)

    def evaluation(self, step: int) -> bool:
        """Whether ``step`` holds an evaluation (it is then taken off the schedule)."""
        if self.evals and step == self.evals[0]:
            self.evals.pop(0)
            return True
        return False

    def check(self, step: int) -> tuple[bool, bool]:
        """(save a checkpoint, then stop) at ``step``; collective where a check is due."""
        if step != self.ck_at:
            return False, False
        verdict = self.ck.at(step)  # which also places the next check
        self.ck_at = self.ck.next_event(step)
        return verdict
