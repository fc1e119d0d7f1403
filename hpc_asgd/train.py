"""``run(config, launch) -> summary``: the one place that wires the parts together.

config -> comm -> data -> model in a flat buffer -> update rule + synchroniser -> steps -> outputs.

It builds the library's parts (``FlatModel``, the rule, the synchroniser, a ``StepSpec``: the
same classes a training script of your own uses) from the configuration, and hands them to
one of two process layouts that run the same step (``step.Stepper``) on the same event
schedule (``driver.Events``: blocking rounds, evaluations, checkpoint checks at fixed node
steps, in step order, so the ranks agree on every collective by construction):
- in process (W = 1, the default): the rank's own process takes every node step
  (``loops.train_in_process``);
- workers (W > 1, or ``--spawn-workers``): W spawned processes take node steps from a shared
  counter while the rank's main process supervises them, evaluates, and runs the blocking
  averaging rounds at node-step boundaries (``loops.train_workers``).
With a non-blocking synchroniser the ranks' steps count against the job's budget
(``--budget job``, ``rounds.Budget``): a rank that has taken its scheduled steps goes on with
extra ones, unevaluated, and one that finds the budget spent first stops short, still running
its remaining events in order; with ``--budget rank --keep-training`` a rank trains on until
every rank has taken its own steps. The final average and evaluation follow as usual.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hpc_asgd import elastic, joiners, metrics, plugins, signals
from hpc_asgd.checkpoint import Checkpointer
from hpc_asgd.comm import Comm, make_comm
from hpc_asgd.config import Config, shares_budget
from hpc_asgd.data import Dataset, ShardSampler, load_dataset
from hpc_asgd.delays import Delays
from hpc_asgd.driver import Job, Tracker
from hpc_asgd.env import Launch, is_tty
from hpc_asgd.evaluate import Evaluator
from hpc_asgd.flat import FlatModel
from hpc_asgd.loops import train_in_process, train_workers
from hpc_asgd.models import build_model
from hpc_asgd.optim import FlatAdamW, FlatOptimizer, FlatSGD, Schedule
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules import make_rule
from hpc_asgd.stats import NSTATS
from hpc_asgd.step import StepSpec, augment_seed
from hpc_asgd.sync import make_synchronizer
from hpc_asgd.workers import spawn_context, start_early

__all__ = ["PRELOAD", "Tracker", "run", "spawns_workers"]

# The application's modules a worker needs (the zoo, the splits, your own factories' loader):
# its fork server imports them once (``workers.spawn_context``).
PRELOAD = ("hpc_asgd.data", "hpc_asgd.models", "hpc_asgd.plugins")


def spawns_workers(cfg: Config) -> bool:
    """Whether the rank spawns worker processes (sharing its model through the update rule)
    or takes every step itself (W = 1: no update rule in play). A synchroniser that averages
    in the rank's main process while training goes on (local-async) needs workers."""
    w = cfg.workers
    return w.workers > 1 or w.spawn_workers or SYNCHRONIZERS.get(cfg.sync.algo).needs_workers


def _threads_per_rank(launch: Launch) -> int:
    """Cores this rank may use: OMP_NUM_THREADS when set, its affinity mask if the launcher
    bound it, else a fair share of the node's cores among its ranks."""
    if launch.threads:
        return launch.threads
    mask = len(os.sched_getaffinity(0))
    bound = mask < (os.cpu_count() or mask)
    return max(1, mask if bound else mask // max(1, launch.local_size))


def run(
    cfg: Config, launch: Launch, comm: Comm | None = None, tracker: Tracker | None = None
) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to ``--out`` by rank 0).

    ``cfg`` is validated here (again, cheaply) so that library callers get the same checks as
    the CLI; the CLI validates before it starts the engine, so that errors need no collective.
    The SIGTERM / SIGUSR1 handlers (``signals``) are installed for the call unless the caller
    (the CLI) installed them already, for the life of the process.
    """
    ours = signals.install()
    try:
        return _run(cfg, launch, comm, tracker or Tracker())
    finally:
        if ours:
            signals.restore()


def schedule_of(cfg: Config) -> Schedule:
    """The LR schedule over (fractional) epochs."""
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


def step_spec(cfg: Config, data: Dataset, rank: int, world: int, launch: Launch) -> StepSpec:
    """How this rank's steps are made, from the configuration."""
    o, r = cfg.optim, cfg.run
    optimizer: Callable[[], FlatOptimizer]
    if o.optimizer == "adamw":
        betas = (float(o.adam_betas[0]), float(o.adam_betas[1]))
        optimizer = functools.partial(FlatAdamW, betas, o.adam_eps, o.weight_decay)
    else:
        optimizer = functools.partial(FlatSGD, o.momentum, o.weight_decay, o.nesterov)
    return StepSpec(
        data.train,
        cfg.data.batch_size,
        r.seed,
        rank,
        world,
        plugins.loss_function(cfg.model.loss),
        optimizer,
        schedule_of(cfg),
        Delays.from_config(cfg, rank, 0),
        r.slow_factor if r.slow_rank == rank else 1.0,  # straggler injection
        launch.fault,
    )


def _run(cfg: Config, launch: Launch, comm: Comm | None, tracker: Tracker) -> dict:
    t_start = time.perf_counter()
    cfg.validate(launch.size, launch.local_size)
    elastic.check(cfg, launch)
    cfg.check_paths()
    cfg.check_factories()
    if spawns_workers(cfg):  # the workers' fork server imports torch while the data loads
        start_early(preload=PRELOAD)
    rank_threads = _threads_per_rank(launch)
    torch.set_num_threads(rank_threads)
    comm = comm or make_comm(cfg.run.comm, launch, cfg.run.comm_timeout)
    d, w, r = cfg.data, cfg.workers, cfg.run
    device = torch.device(r.device)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    load = functools.partial(
        load_dataset,
        d.dataset,
        d.data_dir,
        verify=d.verify,
        synthetic_size=d.synthetic_size,
        seed=r.seed,
    )
    if d.download and not launch.joining:  # rank 0 fetches (once, onto the shared file
        # system); the others wait
        if comm.rank == 0:
            load(download=True)
        comm.barrier()
    data = load(download=False)
    # the model's builder: the workers (and the evaluation copy) make theirs with it
    factory = functools.partial(build_model, cfg.model.model, data.input_shape, data.num_classes)
    torch.manual_seed(r.seed)
    model = factory()
    spawn = spawns_workers(cfg)
    if spawn:  # the workers own the rank's cores; this process's evaluation passes (beside
        # them) and averages would only contend with them, and OpenMP threads that spin
        # after each parallel region cost them ~10 ms of CPU per pass (measured, 2 cores)
        torch.set_num_threads(1)
    elif w.threads_per_worker:  # this process is the rank's one worker
        torch.set_num_threads(w.threads_per_worker)
    flat = FlatModel(model, device=device, shared=spawn)
    ctx = spawn_context(PRELOAD)
    rule = make_rule(cfg, flat.params, ctx)
    # a replacement (--max-ranks): where the running job stands, from its rank 0 (collective)
    joined = joiners.receive(comm) if launch.joining else None
    spe = ShardSampler(len(data.train), comm.rank, comm.size, d.batch_size, r.seed).steps_per_epoch
    sync = make_synchronizer(cfg, comm, flat, rule, spe)  # every rank takes rank 0's model
    total = max(1, math.ceil(r.epochs * spe))
    if shares_budget(cfg, comm.size):  # the ranks' node steps count together
        sync.budget.steps, sync.budget.world = total * comm.size, comm.size
    every = max(1, round(r.eval_every * spe))
    stats = torch.zeros((w.workers, NSTATS), dtype=torch.float64)
    out = Path(r.out) if r.out else None
    samples = d.batch_size * comm.size  # per node step of every rank
    progress = metrics.Progress(total, spe, comm.rank == 0, is_tty(sys.stderr), samples)
    spec = step_spec(cfg, data, comm.rank, comm.size, launch)
    evaluator = Evaluator(
        data, comm, device, stats, spe, d.batch_size, progress, out, t_start, spec.loss
    )
    evaluator.job_epochs = bool(sync.budget.steps)
    ck = Checkpointer(cfg, comm)
    resumed = ck.resume(total) if joined is None else None
    job = Job(
        cfg,
        launch,
        comm,
        data,
        flat,
        rule,
        sync,
        spec,
        factory,
        stats,
        total,
        spe,
        [*range(every, total, every), total],
        evaluator,
        device,
        rank_threads,
        progress,
        ck,
        resumed,
        tracker,
        spawn,
        t_start=t_start,
    )
    job.world_size_start, job.total_start = comm.size, total
    if joined is not None:  # the running job's schedule, synchroniser state and checks
        joiners.adopt_on_joiner(job, joined)
    if resumed is not None:  # each rank takes back its own model, counters and metrics
        job.load_state(resumed)
        # A final or a workers' state (resumed with --force-resume, say by a longer run) has
        # no W = 1 optimizer or RNG states: those then start afresh, as the workers' do.
        fresh = torch.Generator().manual_seed(augment_seed(r.seed, comm.rank, 0)).get_state()
        job.resumed = {"optimizer": None, "generator": fresh, "torch_rng": torch.get_rng_state()}
        job.resumed |= resumed
    board = None
    if r.tensorboard and comm.rank == 0:
        from hpc_asgd.board import Board

        board = Board(Path(r.tensorboard), cfg.to_toml())
        lr, stats_of = spec.schedule, sync.stats
        evaluator.on_row = lambda step, row: board.row(step, row, lr(row["epoch"]), stats_of())
    try:
        summary = _train(job, ck, ctx, resumed, total, spawn, out)
    except BaseException:
        if board is not None:
            board.close(None)
        raise
    finally:
        progress.close()
    if board is not None:
        board.close(summary)
    return summary


def _train(
    job: Job, ck: Checkpointer, ctx, resumed: dict | None, total: int, spawn: bool, out: Path | None
) -> dict:
    """Train (or, resumed complete, only summarise) and write the outputs: the summary."""
    if resumed is not None and resumed["step"] == total:  # complete: only the outputs
        train_s, job.extra = resumed["train_s"], resumed.get("extra", 0)
    else:
        train_s = train_workers(job, ctx) if spawn else train_in_process(job)
        job.run_s = time.perf_counter() - job.t_start - job.setup_s
        if ck.root is not None:  # committed before the outputs: a rerun finds it complete
            ck.save(total, job.state(total, train_s, {"extra": job.extra}))
    return metrics.summarise(job, train_s, out)
