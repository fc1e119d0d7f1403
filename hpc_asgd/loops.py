"""The CLI's two training loops over one :class:`~hpc_asgd.driver.Job`, on the same event
schedule (:class:`~hpc_asgd.driver.Events`: the synchroniser's rounds through its clock, the
evaluations, the checkpoint checks, at the same node steps on every rank):

- :func:`train_in_process`: W = 1 in the rank's own process, which steps, then makes the calls
  the step owes (the clock's ``round`` and ``poll``: the rounds' own cost stalls the steps);
- :func:`train_workers`: W spawned workers take node steps from a shared counter
  (``hpc_asgd.workers``) while the rank's main process supervises them, evaluates and averages
  (its non-blocking rounds overlap the workers), holding them at each event's node step.

Both return the training seconds (first step to last, without evaluation passes).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from hpc_asgd import elastic
from hpc_asgd.driver import Events, Job
from hpc_asgd.errors import PeerLost
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules.base import AtomicArray
from hpc_asgd.stats import STEPS, check_finite
from hpc_asgd.step import Stepper
from hpc_asgd.sync.rounds import Budget
from hpc_asgd.workers import (
    DONE,
    LIMIT,
    NCTL,
    NEXT,
    READY,
    STOP,
    WorkerPool,
    WorkerSpec,
    nap,
    stop_server,
)

KEEP_GOING = 1 << 62  # the workers' step bound with --keep-training: their STOP ends them


def train_in_process(job: Job) -> float:
    """W = 1 in the rank's own process: step, then the events the step holds."""
    flat, sync = job.flat, job.sync
    job.rule.attach(0)
    hook = sync.grads_ready if sync.averages_gradients else None
    stepper = job.step.stepper(flat, job.rule, job.stats[0], job.device, grads_hook=hook)
    stepper.offset = sync.budget.offset.numpy()  # the job's progress, for the LR schedule
    start, train_s = 0, 0.0
    if job.resumed is not None:  # the rest of a W = 1 run's state: bitwise continuation
        start, train_s = job.resumed["step"], job.resumed["train_s"]
        if job.resumed["optimizer"] is not None:
            stepper.opt.load_state_dict(job.resumed["optimizer"])
        stepper.gen.set_state(job.resumed["generator"])
        torch.set_rng_state(job.resumed["torch_rng"])
    events = Events(job, start)
    job.begin(start)
    t_seg = time.perf_counter()
    job.setup_s = t_seg - job.t_start
    budget = job.start_budget(start, train_s)
    flat.module.train()
    s = start
    base = (start, float(job.stats[0, STEPS]))  # node step <-> steps counted (--min-ranks)
    while s < job.total:
        try:
            s, train_s, t_seg = _in_process(job, stepper, events, budget, s, train_s, t_seg)
        except PeerLost as err:  # --min-ranks: shrink to the survivors and go on
            taken = base[0] + round(float(job.stats[0, STEPS]) - base[1])
            s, events = elastic.recover(job, err, taken, events, stepper)
            base, budget = (s, float(job.stats[0, STEPS])), job.sync.budget
            continue
        s += 1
    return train_s


def _in_process(
    job: Job, stepper: Stepper, events: Events, budget: Budget, s: int, train_s: float,
    t_seg: float,
) -> tuple[int, float, float]:  # fmt: skip
    """Node step ``s`` (0-based), then the events it holds; returns (s, train_s, t_seg) as
    the step left them (``s`` moves on to the next event when the budget is spent)."""
    flat, sync, ev, clock = job.flat, job.sync, job.evaluator, events.clock
    if budget.spent(s):  # no more steps: this rank's remaining events still run, in order
        if not job.extra:  # (its peers meet it there); the steps it did not take:
            job.extra = s - job.total
        s = events.next - 1
    else:
        job.tracker.step = s + 1  # node steps are named 1-based, as in the error lines
        if not stepper.step(s):
            check_finite(job.stats, job.cfg.run.max_nonfinite, job.cfg.optim.lr)
    ev.complete(wait=False)
    clock.round(s + 1)
    clock.poll(s + 1)
    job.progress.step(s + 1)
    if events.evaluation(s + 1):
        final = s + 1 == job.total
        if final and job.trains_on and not budget.exhausted:
            job.extra = _keep_training(job, stepper)
        train_s += time.perf_counter() - t_seg
        job.rule.publish()  # evaluate the latest parameters, in the flat buffer
        flat.bind_params(flat.params)
        if final:  # the final exact average comes before the final evaluation
            sync.finish(job.total + job.extra)  # after the other ranks' rounds
        ev.at(s + 1, flat.module, final=final)  # before the end: the sum completes later
        t_seg = time.perf_counter()
    save, halt = events.check(s + 1)
    if save and s + 1 < job.total:
        state = {
            "optimizer": stepper.opt.state_dict(),
            "generator": stepper.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        job.checkpoint(s + 1, train_s + time.perf_counter() - t_seg, halt, state)
    return s, train_s, t_seg


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


def train_workers(job: Job, ctx) -> float:
    """W spawned workers take node steps; this process supervises, averages and evaluates,
    handling the events (blocking rounds, evaluations, checks) in node-step order on every
    rank, with the workers held at the next one (``LIMIT``). Under ``--min-ranks`` a lost
    peer (``PeerLost``) holds the workers between steps, shrinks the job to the survivors
    (``elastic.recover``: the shared model is theirs averaged) and starts new workers on the
    new shard, from the node step this rank had reached."""
    cfg, flat = job.cfg, job.flat
    w = cfg.workers
    job.stats.share_memory_()
    job.sync.budget.offset.share_memory_()
    ctl = AtomicArray(NCTL)
    threads = w.threads_per_worker or max(1, job.rank_threads // w.workers)
    spec = WorkerSpec(
        job.comm.rank,
        job.model,
        job.step,
        flat.data,
        job.rule,
        ctl,
        job.stats,
        KEEP_GOING if job.trains_on else job.total,
        threads,
        str(job.device),
        cfg.run.comm_timeout,
        ctx.SimpleQueue(),
        offset=job.sync.budget.offset,
        wake=ctx.Semaphore(0),
    )
    run = _Supervised(job, WorkerPool(spec, w.workers, ctx))
    if job.resumed is not None:  # model and counters; the workers' optimizers start afresh
        run.start, run.train_before = job.resumed["step"], job.resumed["train_s"]
        ctl.t[NEXT] = ctl.t[DONE] = run.start
    events = Events(job, run.start)
    try:
        run.pool.start()
        run.pool.wait_ready()
        # The ranks start training together: spawning takes seconds, differently on each rank,
        # and a rank that started early would run its first steps (or, with --keep-training,
        # extra ones) alone.
        job.comm.barrier()
        job.begin(run.start)
        run.t0 = time.perf_counter()  # training time starts when all may step
        job.setup_s = run.t0 - job.t_start
        job.start_budget(run.start, run.train_before)
        ctl[LIMIT].store(events.next)
        while True:
            try:
                return run.supervise(events)
            except PeerLost as err:  # --min-ranks: shrink to the survivors and go on
                events = run.shrink(err, events)
    finally:
        run.pool.stop()
        ctl.close()
        stop_server()


class _Supervised:
    """The rank's main process over its workers (:func:`train_workers`)."""

    def __init__(self, job: Job, pool: WorkerPool) -> None:
        self.job, self.pool = job, pool
        # the evaluation model: a private copy, filled from a snapshot of the shared one
        self.eval_flat = FlatModel(job.model(), device=job.device)
        self.start, self.train_before = 0, 0.0
        self.t0 = 0.0
        # workers held for an evaluation (its snapshot, or its pass): not training time
        self.paused_s = 0.0

    def supervise(self, events: Events) -> float:
        """Until the last event; returns the training seconds."""
        job, pool = self.job, self.pool
        cfg, flat, rule, sync, total, ev = (
            job.cfg, job.flat, job.rule, job.sync, job.total, job.evaluator,
        )  # fmt: skip
        budget, spec, ctl = sync.budget, pool.spec, pool.spec.ctl
        eval_flat = self.eval_flat
        while True:
            if pool.poll():  # the workers' divergence count, at the same (throttled) pace
                check_finite(job.stats, cfg.run.max_nonfinite, cfg.optim.lr)
            event = events.next
            done = job.tracker.step = ctl[DONE].load()
            ev.complete(wait=False)
            job.progress.step(done)
            if sync.overlaps:  # this process is the averager: rounds overlap the workers
                sync.poll(done)
            if budget.spent(done):  # the job's budget is spent: the workers end the step they
                ctl[STOP].store(1)  # are in; this rank's remaining events still run, in order
            elif done < event:  # until the event's step is done, a supervision check or a round
                spec.wake.acquire(timeout=nap(sync))
                continue
            events.clock.round(event)  # workers are held at the limit: nothing is in flight
            if events.evaluation(event):
                if event == total and job.trains_on and not budget.exhausted:  # past the limit
                    ctl[LIMIT].store(KEEP_GOING)
                    while not job.trained_on(ctl[DONE].load()):
                        ev.complete(wait=False)
                        pool.poll()
                        time.sleep(nap(sync))
                    ctl[STOP].store(1)  # workers end the step they are in, then exit
                if event == total:  # every step is done; the workers' exit is not training
                    train_end = time.perf_counter()
                    job.end_training()  # the averager's CPU time
                    pool.join()
                    job.extra = ctl[DONE].load() - total
                    # after the other ranks' rounds: the rule's latest version, averaged
                    sync.finish(total + job.extra)
                # The workers are held at the evaluation step: the model evaluated is a snapshot
                # after exactly ``event`` node steps. They resume once it is taken, unless a
                # checkpoint is due here too (its rows include this one), and the pass runs
                # beside them; the sum over the ranks (others may be behind) completes in the
                # background.
                t_eval = time.perf_counter()
                rule.snapshot(eval_flat.params)
                eval_flat.data[flat.n_params :].copy_(flat.data[flat.n_params :])
                if event < total and event != events.ck_at:
                    ctl[LIMIT].store(events.next)  # release the workers
                    self.paused_s += time.perf_counter() - t_eval
                    ev.at(event, eval_flat.module)
                    continue
                ev.at(event, eval_flat.module, final=event == total)
                if event == total:
                    return self.train_before + train_end - self.t0 - self.paused_s
                self.paused_s += time.perf_counter() - t_eval
            save, halt = events.check(event)  # workers are held: the shared model is still
            if save and event < total:
                job.checkpoint(event, self.train_before + time.perf_counter() - self.t0, halt)
            ctl[LIMIT].store(events.next)  # release the workers

    def shrink(self, err: PeerLost, events: Events) -> Events:
        """A peer was lost: hold the workers between steps, stop them, shrink the job
        (``elastic.recover``: collective over the survivors, which average the shared model)
        and start new workers on this rank's new shard from the node step it had reached.
        The workers' optimizer states start afresh, as on a resume."""
        job, old = self.job, self.pool
        ctl = old.spec.ctl
        ctl[LIMIT].store(0)  # no worker claims another step
        deadline = time.monotonic() + old.stall_timeout
        while ctl[NEXT].load() != ctl[DONE].load():  # the steps in flight end
            old.check()
            if time.monotonic() > deadline:
                raise err
            time.sleep(1e-3)
        old.stop()
        taken = ctl[DONE].load()
        step, events = elastic.recover(job, err, taken, events, None)
        spec = replace(
            old.spec,
            step=job.step,
            total=KEEP_GOING if job.trains_on else job.total,
            busy=None,
        )
        for cell, value in ((NEXT, step), (DONE, step), (STOP, 0), (READY, 0), (LIMIT, 0)):
            ctl.t[cell] = value
        t_workers = time.perf_counter()
        self.pool = WorkerPool(spec, old.n, old.ctx)
        self.pool.start()
        self.pool.wait_ready()
        ctl[LIMIT].store(events.next)
        row = job.membership[-1]  # the loss's row: when the new workers took over
        row["workers_restart_s"] = round(time.perf_counter() - t_workers, 3)
        row["resumed_unix"] = round(time.time(), 3)
        return events
