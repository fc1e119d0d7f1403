"""``run(config, launch) -> summary``: the one place that wires the parts together.

config -> comm -> data -> model in a flat buffer -> update rule + synchroniser -> steps -> outputs.

Two process layouts run the same step (``step.Stepper``) on the same event schedule
(``driver.Events``: blocking rounds, evaluations, checkpoint checks at fixed node steps, in
step order, so the ranks agree on every collective by construction):
- in process (W = 1, the default): the rank's own process takes every node step (here);
- workers (W > 1, or ``--spawn-workers``): W spawned processes take node steps from a shared
  counter while the rank's main process supervises them, evaluates, and runs the blocking
  averaging rounds at node-step boundaries (``workers.train_workers``).
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
from pathlib import Path

import torch

from hpc_asgd import metrics, signals
from hpc_asgd.checkpoint import Checkpointer
from hpc_asgd.comm import Comm, make_comm
from hpc_asgd.config import Config, shares_budget
from hpc_asgd.data import ShardSampler, load_dataset
from hpc_asgd.driver import Events, Job, Tracker
from hpc_asgd.env import Launch, is_tty
from hpc_asgd.evaluate import Evaluator
from hpc_asgd.flat import FlatModel
from hpc_asgd.models import build_model
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.rules import make_rule
from hpc_asgd.stats import NSTATS, check_finite
from hpc_asgd.step import Stepper, inject, slow_factor
from hpc_asgd.sync import make_synchronizer
from hpc_asgd.workers import augment_seed, spawn_context, start_early, train_workers

__all__ = ["Tracker", "run", "spawns_workers"]


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


def _run(cfg: Config, launch: Launch, comm: Comm | None, tracker: Tracker) -> dict:
    t_start = time.perf_counter()
    cfg.validate(launch.size, launch.local_size)
    cfg.check_paths()
    if spawns_workers(cfg):  # the workers' fork server imports torch while the data loads
        start_early()
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
    if d.download:  # rank 0 fetches (once, onto the shared file system); the others wait
        if comm.rank == 0:
            load(download=True)
        comm.barrier()
    data = load(download=False)
    torch.manual_seed(r.seed)
    model = build_model(cfg.model.model, data.input_shape, data.num_classes)
    spawn = spawns_workers(cfg)
    if spawn:  # the workers own the rank's cores; this process's evaluation passes (beside
        # them) and averages would only contend with them, and OpenMP threads that spin
        # after each parallel region cost them ~10 ms of CPU per pass (measured, 2 cores)
        torch.set_num_threads(1)
    elif w.threads_per_worker:  # this process is the rank's one worker
        torch.set_num_threads(w.threads_per_worker)
    flat = FlatModel(model, device=device, shared=spawn)
    ctx = spawn_context()
    rule = make_rule(cfg, flat.params, ctx)
    sampler = ShardSampler(len(data.train), comm.rank, comm.size, d.batch_size, r.seed)
    spe = sampler.steps_per_epoch
    sync = make_synchronizer(cfg, comm, flat, rule, spe)
    sync.start()
    total = max(1, math.ceil(r.epochs * spe))
    if shares_budget(cfg, comm.size):  # the ranks' node steps count together
        sync.budget.steps, sync.budget.world = total * comm.size, comm.size
    every = max(1, round(r.eval_every * spe))
    stats = torch.zeros((w.workers, NSTATS), dtype=torch.float64)
    out = Path(r.out) if r.out else None
    progress = metrics.Progress(total, spe, comm.rank == 0, is_tty(sys.stderr))
    evaluator = Evaluator(data, comm, device, stats, spe, d.batch_size, progress, out, t_start)
    evaluator.job_epochs = bool(sync.budget.steps)
    ck = Checkpointer(cfg, comm)
    resumed = ck.resume(total)
    job = Job(
        cfg,
        launch,
        comm,
        data,
        flat,
        rule,
        sync,
        sampler,
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
    if resumed is not None:  # each rank takes back its own model, counters and metrics
        job.load_state(resumed)
        # A final or a workers' state (resumed with --force-resume, say by a longer run) has
        # no W = 1 momentum or RNG states: those then start afresh, as the workers' do.
        fresh = torch.Generator().manual_seed(augment_seed(r.seed, comm.rank, 0)).get_state()
        job.resumed = {"momentum": None, "generator": fresh, "torch_rng": torch.get_rng_state()}
        job.resumed |= resumed
    if resumed is not None and resumed["step"] == total:  # complete: only the outputs
        train_s, job.extra = resumed["train_s"], resumed.get("extra", 0)
    else:
        train_s = train_workers(job, ctx) if spawn else _train_in_process(job)
        job.run_s = time.perf_counter() - job.t_start - job.setup_s
        if ck.root is not None:  # committed before the outputs: a rerun finds it complete
            ck.save(total, job.state(total, train_s, {"extra": job.extra}))
    return metrics.summarise(job, train_s, out)


def _train_in_process(job: Job) -> float:
    """W = 1 in the rank's own process: step, then the events the step holds."""
    comm, flat, sync, spe, ev = job.comm, job.flat, job.sync, job.spe, job.evaluator
    job.rule.attach(0)
    gen = torch.Generator().manual_seed(augment_seed(job.cfg.run.seed, comm.rank, 0))
    hook = sync.grads_ready if sync.averages_gradients else None
    slow = slow_factor(job.cfg, comm.rank)
    stepper = Stepper(
        job.cfg, job.data, flat, job.rule, job.sampler, gen, job.device, job.stats[0], hook, slow
    )
    stepper.offset = sync.budget.offset.numpy()  # the job's progress, for the LR schedule
    start, train_s = 0, 0.0
    if job.resumed is not None:  # the rest of a W = 1 run's state: bitwise continuation
        start, train_s = job.resumed["step"], job.resumed["train_s"]
        stepper.opt.buf = job.resumed["momentum"]
        gen.set_state(job.resumed["generator"])
        torch.set_rng_state(job.resumed["torch_rng"])
    events = Events(job, start)
    job.begin(start)
    t_seg = time.perf_counter()
    job.setup_s = t_seg - job.t_start
    budget = job.start_budget(start, train_s)
    flat.module.train()
    s = start
    while s < job.total:
        if budget.spent(s):  # no more steps: this rank's remaining events still run, in order
            if not job.extra:  # (its peers meet it there); the steps it did not take:
                job.extra = s - job.total
            s = events.next - 1
        else:
            job.tracker.step = s + 1  # node steps are named 1-based, as in the error lines
            if not stepper.step(s, poison=inject(job.launch.fault, comm.rank, s)):
                check_finite(job.stats, job.cfg.run.max_nonfinite, job.cfg.optim.lr)
        ev.complete(wait=False)
        events.round(s + 1)
        if sync.overlaps:  # the rounds' own cost (snapshot, progress, delta) stalls the steps
            t_poll = time.perf_counter()
            sync.poll(s + 1, (s + 1) / spe)
            sync.wait_s += time.perf_counter() - t_poll
        job.progress.step(s + 1)
        if events.evaluation(s + 1):
            final = s + 1 == job.total
            if final and job.trains_on and not budget.exhausted:
                job.extra = _keep_training(job, stepper)
            train_s += time.perf_counter() - t_seg
            job.rule.publish()  # evaluate the latest parameters, in the flat buffer
            flat.bind_params(flat.params)
            if final:
                sync.drain(job.total + job.extra)  # wait for the other ranks' rounds
                sync.finish()  # the final exact average comes before the final evaluation
            ev.at(s + 1, flat.module, final=final)  # before the end: the sum completes later
            t_seg = time.perf_counter()
        save, halt = events.check(s + 1)
        if save and s + 1 < job.total:
            state = {
                "momentum": stepper.opt.buf,
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            job.checkpoint(s + 1, train_s + time.perf_counter() - t_seg, halt, state)
        s += 1
    return train_s


def _keep_training(job: Job, stepper: Stepper) -> int:
    """In process, after the last scheduled step: steps past it, until the job's budget is
    spent (``--budget job``) or, with ``--keep-training``, until the slower ranks finish."""
    sync, x = job.sync, job.total
    while True:
        t_poll = time.perf_counter()
        over = job.trained_on(x)
        sync.wait_s += time.perf_counter() - t_poll
        if over:
            return x - job.total
        stepper.step(x)
        job.evaluator.complete(wait=False)
        x += 1
