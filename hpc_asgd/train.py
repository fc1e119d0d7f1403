"""``run(config, launch) -> summary``: the one place that wires the parts together.

config -> comm -> data -> model in a flat buffer -> update rule + synchroniser -> steps -> outputs.

Two process layouts run the same step (``step.Stepper``):
- in process (W = 1, the default): the rank's own process takes every node step;
- workers (W > 1, or ``--spawn-workers``): W spawned processes take node steps from a shared
  counter while the rank's main process supervises them, evaluates, and runs the blocking
  averaging rounds at node-step boundaries (workers pause at ``limit``).
Every rank runs the same number of node steps and the same sequence of collectives (averaging
rounds at fixed node steps, evaluations at fixed node steps, in step order), so the ranks agree
on every collective by construction. With ``--keep-training`` (non-blocking synchronisers) a
rank that has taken its steps goes on with extra ones, unevaluated, until every rank has
taken its own; the final average and evaluation follow as usual.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hpc_asgd import metrics, signals
from hpc_asgd.checkpoint import Checkpointer
from hpc_asgd.comm import Comm, make_comm
from hpc_asgd.comm.base import gather_hosts
from hpc_asgd.config import Config
from hpc_asgd.data import Dataset, ShardSampler, load_dataset
from hpc_asgd.env import Launch, is_tty
from hpc_asgd.errors import OutputError, Preempted
from hpc_asgd.flat import FlatModel
from hpc_asgd.models import build_model
from hpc_asgd.shm import AtomicArray, make_rule
from hpc_asgd.shm.base import UpdateRule
from hpc_asgd.shm.workers import (
    DONE,
    LIMIT,
    NCTL,
    NEXT,
    STOP,
    WorkerPool,
    WorkerSpec,
    augment_seed,
    spawn_context,
)
from hpc_asgd.step import (
    APPLIED,
    DROPPED,
    LOCK_WAIT,
    LOSS_SUM,
    NONFINITE,
    NSTATS,
    STALE0,
    STEPS,
    TRIES0,
    DivergedError,
    Stepper,
    check_finite,
    inject,
    slow_factor,
)
from hpc_asgd.sync import HierAvg, Synchronizer, make_synchronizer

EVAL_BATCH = 512
KEEP_GOING = 1 << 62  # the workers' step bound with --keep-training: their STOP ends them


def spawns_workers(cfg: Config) -> bool:
    """Whether the rank spawns worker processes (sharing its model through the update rule)
    or takes every step itself (W = 1: no update rule in play). local-async needs the rank's
    main process free to average while a worker trains."""
    w = cfg.workers
    return w.workers > 1 or w.spawn_workers or cfg.sync.algo == "local-async"


def _threads_per_rank(launch: Launch) -> int:
    """Cores this rank may use: OMP_NUM_THREADS when set, its affinity mask if the launcher
    bound it, else a fair share of the node's cores among its ranks."""
    if launch.threads:
        return launch.threads
    mask = len(os.sched_getaffinity(0))
    bound = mask < (os.cpu_count() or mask)
    return max(1, mask if bound else mask // max(1, launch.local_size))


def evaluate(
    model: torch.nn.Module, data: Dataset, comm: Comm, device: torch.device, extra: torch.Tensor
) -> torch.Tensor:
    """Test loss and accuracy over the whole test set, each rank taking a disjoint shard with
    its own model: ``[correct, loss_sum, count, *extra]`` of this rank's shard, to be summed
    over the ranks by one allreduce (the caller's, blocking or not)."""
    sampler = ShardSampler(
        len(data.test), comm.rank, comm.size, EVAL_BATCH, seed=0, shuffle=False, drop_last=False
    )
    acc = torch.zeros(3, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in sampler.epoch(0):
            x, y = data.test.batch(idx, train=False)
            out = model(x.to(device))
            y = y.to(device)
            acc[0] += (out.argmax(1) == y).sum().item()
            acc[1] += F.cross_entropy(out, y, reduction="sum").item()
            acc[2] += y.numel()
    model.train(was_training)
    return torch.cat([acc, extra.to(torch.float64)])


@dataclass
class Tracker:
    """What a caller may want to know after a failure: the last node step this rank saw."""

    step: int | None = None


@dataclass
class _Run:
    """What both process layouts need; built once by ``run``."""

    cfg: Config
    launch: Launch
    comm: Comm
    data: Dataset
    flat: FlatModel
    rule: UpdateRule
    sync: Synchronizer
    sampler: ShardSampler
    stats: torch.Tensor  # (W, NSTATS) float64
    total: int  # node steps
    spe: int  # node steps per epoch
    evals: list[int]  # node steps after which to evaluate; the last is ``total``
    # (step, model, nonblocking=False) -> None, or complete(wait) -> bool when non-blocking
    evaluate_at: Callable[..., Callable[[bool], bool] | None]
    device: torch.device
    rank_threads: int
    progress: metrics.Progress
    ck: Checkpointer
    rows: list[dict]
    seen: torch.Tensor  # (loss_sum, steps) at the last evaluation
    resumed: dict | None  # the checkpoint this run resumes from
    tracker: Tracker
    extra: int = 0  # --keep-training: node steps taken past ``total`` while slower ranks finished
    t_start: float = 0.0  # perf_counter() when ``run`` began
    setup_s: float = 0.0  # from ``t_start`` to this rank's first training step (this session)

    def state(self, step: int, train_s: float, extra: dict | None = None) -> dict:
        """What a checkpoint holds (tensors and plain containers: ``weights_only``-safe)."""
        self.rule.publish()
        return {
            "step": step,
            "flat": self.flat.data.detach().cpu().clone(),
            "stats": self.stats.clone(),
            "rows": list(self.rows),
            "seen": self.seen.clone(),
            "train_s": train_s,
            "rounds": self.sync.rounds,
            "group_rounds": getattr(self.sync, "group_rounds", 0),
            "config": self.cfg.to_dict(),
            **(extra or {}),
        }


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
    rank_threads = _threads_per_rank(launch)
    torch.set_num_threads(rank_threads)
    comm = comm or make_comm(cfg.run.comm, launch, cfg.run.comm_timeout)
    d, w, r = cfg.data, cfg.workers, cfg.run
    device = torch.device(r.device)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    load = {"verify": d.verify, "synthetic_size": d.synthetic_size, "seed": r.seed}
    if d.download:  # rank 0 fetches (once, onto the shared file system); the others wait
        if comm.rank == 0:
            load_dataset(d.dataset, d.data_dir, download=True, **load)
        comm.barrier()
    data = load_dataset(d.dataset, d.data_dir, download=False, **load)
    torch.manual_seed(r.seed)
    model = build_model(cfg.model.model, data.input_shape, data.num_classes)
    # local-async needs the rank's main process free to average while workers train.
    spawn = spawns_workers(cfg)
    if not spawn and w.threads_per_worker:  # this process is the rank's one worker
        torch.set_num_threads(w.threads_per_worker)
    flat = FlatModel(model, device=device, shared=spawn)
    ctx = spawn_context()
    rule = make_rule(cfg, flat.params, ctx)
    sampler = ShardSampler(len(data.train), comm.rank, comm.size, d.batch_size, r.seed)
    spe = sampler.steps_per_epoch
    sync = make_synchronizer(cfg, comm, flat, rule, spe)
    sync.start()
    total = max(1, math.ceil(r.epochs * spe))
    every = max(1, round(r.eval_every * spe))
    stats = torch.zeros((w.workers, NSTATS), dtype=torch.float64)
    out = Path(r.out) if r.out else None
    progress = metrics.Progress(total, spe, comm.rank == 0, is_tty(sys.stderr))
    rows: list[dict] = []
    seen = torch.zeros(2, dtype=torch.float64)  # (loss_sum, steps) at the last evaluation
    ck = Checkpointer(cfg, comm)
    resumed = ck.resume(total)
    if resumed is not None:  # each rank takes back its own model, counters and metrics
        flat.data.copy_(resumed["flat"])
        rule.load(flat.params)
        stats.copy_(resumed["stats"])
        rows.extend(resumed["rows"])
        seen.copy_(resumed["seen"])
        sync.rounds = resumed["rounds"]
        if isinstance(sync, HierAvg):
            sync.group_rounds = resumed.get("group_rounds", 0)
        # A final or a workers' state (resumed with --force-resume, say by a longer run) has
        # no W = 1 momentum or RNG states: those then start afresh, as the workers' do.
        fresh = torch.Generator().manual_seed(augment_seed(r.seed, comm.rank, 0)).get_state()
        resumed = {
            "momentum": None,
            "generator": fresh,
            "torch_rng": torch.get_rng_state(),
        } | resumed

    def evaluate_at(step: int, eval_model: torch.nn.Module, nonblocking: bool = False):
        """Evaluate this rank's shard now; sum over the ranks and record the row. With
        ``nonblocking`` the sum is an iallreduce and a ``complete(wait) -> bool`` is returned
        (the row is recorded when it completes): a rank ahead of the others never waits for
        them to reach the evaluation. Rows complete in the order they were posted."""
        steps = stats[:, STEPS] - stats[:, NONFINITE]  # skipped steps add no loss
        now = torch.stack([stats[:, LOSS_SUM].sum(), steps.sum()])
        st = evaluate(eval_model, data, comm, device, now - seen)  # (5,) float64
        seen.copy_(now)
        at = round(time.perf_counter() - t_start, 3)  # the time of this rank's evaluation

        def record() -> None:
            before = rows[-1]["samples"] if rows else 0
            row = {
                "epoch": round(step / spe, 4),
                "time_s": at,
                "samples": before + round(float(st[4])) * d.batch_size,  # steps taken, all ranks
                "train_loss": float(st[3] / max(float(st[4]), 1.0)),
                "test_acc": float(st[0] / st[2]),
                "test_loss": float(st[1] / st[2]),
            }
            rows.append(row)
            progress.epoch(row)
            if comm.rank == 0 and out:
                try:
                    metrics.write_jsonl(out / "metrics.jsonl", rows)
                except OSError as e:  # the run goes on; the final write finds a way out
                    progress.warn(f"could not write {out / 'metrics.jsonl'}: {e}")

        if not nonblocking:
            comm.allreduce_(st)
            record()
            return None
        work = comm.iallreduce_(st)

        def complete(wait: bool) -> bool:
            if wait:
                work.wait()
            elif not work.test():
                return False
            record()
            return True

        return complete

    job = _Run(
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
        evaluate_at,
        device,
        rank_threads,
        progress,
        ck,
        rows,
        seen,
        resumed,
        tracker,
        t_start=t_start,
    )
    if resumed is not None and resumed["step"] == total:  # complete: only the outputs
        train_s, job.extra = resumed["train_s"], resumed.get("extra", 0)
    else:
        train_s = _train_workers(job, ctx) if spawn else _train_in_process(job)
        if ck.root is not None:  # committed before the outputs: a rerun finds it complete
            ck.save(total, job.state(total, train_s, {"extra": job.extra}))
    return _summarise(job, rows, train_s, t_start, out)


def _train_in_process(job: _Run) -> float:
    """W = 1 in the rank's own process: step, then the synchroniser, then maybe evaluate."""
    comm, flat, sync, spe = job.comm, job.flat, job.sync, job.spe
    job.rule.attach(0)
    gen = torch.Generator().manual_seed(augment_seed(job.cfg.run.seed, comm.rank, 0))
    hook = sync.grads_ready if sync.averages_gradients else None
    slow = slow_factor(job.cfg, comm.rank)
    stepper = Stepper(
        job.cfg, job.data, flat, job.rule, job.sampler, gen, job.device, job.stats[0], hook, slow
    )
    start, train_s = 0, 0.0
    if job.resumed is not None:  # the rest of a W = 1 run's state: bitwise continuation
        start, train_s = job.resumed["step"], job.resumed["train_s"]
        stepper.opt.buf = job.resumed["momentum"]
        gen.set_state(job.resumed["generator"])
        torch.set_rng_state(job.resumed["torch_rng"])
    stop = sync.next_stop(0, 0.0)
    while stop is not None and stop <= start:  # replay the schedule of rounds up to ``start``
        stop = sync.next_stop(stop, stop / spe)
    pending = [e for e in job.evals if e > start]
    evals = _InFlight()
    _preempted_at_start(job, start)
    t_seg = time.perf_counter()
    job.setup_s = t_seg - job.t_start
    flat.module.train()
    for s in range(start, job.total):
        job.tracker.step = s + 1  # node steps are named 1-based, as in the error lines
        stepper.step(s, poison=inject(job.launch.fault, comm.rank, s))
        check_finite(job.stats, job.cfg.run.max_nonfinite, job.cfg.optim.lr)
        evals.complete(wait=False)
        if s + 1 == stop:
            sync.step_done(stop, stop / spe)
            stop = sync.next_stop(stop, stop / spe)
        if sync.overlaps:  # the rounds' own cost (snapshot, progress, delta) stalls the steps
            t_poll = time.perf_counter()
            sync.poll(s + 1, (s + 1) / spe)
            sync.wait_s += time.perf_counter() - t_poll
        job.progress.step(s + 1)
        if s + 1 == pending[0]:
            if s + 1 == job.total and job.cfg.sync.keep_training:
                job.extra = _keep_training(job, stepper, evals)
            train_s += time.perf_counter() - t_seg
            job.rule.publish()  # evaluate the latest parameters, in the flat buffer
            flat.bind_params(flat.params)
            if s + 1 == job.total:
                sync.drain(job.total)  # wait for the other ranks' non-blocking rounds
                sync.finish()  # the final exact average comes before the final evaluation
                evals.complete(wait=True)
                job.evaluate_at(pending.pop(0), flat.module)
            else:  # no waiting for the other ranks to get there: the sum completes later
                evals.add(job.evaluate_at(pending.pop(0), flat.module, nonblocking=True))
            t_seg = time.perf_counter()
        save, halt = job.ck.at(s + 1)
        if save and s + 1 < job.total:
            evals.complete(wait=True)  # their rows belong in the checkpoint
            sync.quiesce(s + 1)
            extra = {
                "momentum": stepper.opt.buf,
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            now = train_s + time.perf_counter() - t_seg
            job.ck.save(s + 1, job.state(s + 1, now, extra), job.launch.fault)
            flat.bind_params(flat.params)
            if halt:
                raise Preempted(s + 1)
    return train_s


def _preempted_at_start(job: _Run, start: int) -> None:
    """A USR1 during start-up (data, model, workers): the ranks agree on it before the first
    step and exit for a requeue; nothing is lost, nothing new needs saving."""
    job.tracker.step = start
    if job.ck.root is None:
        return
    flag = torch.tensor([float(signals.usr1_seen())])
    job.comm.allreduce_(flag, op="max")
    if flag[0]:
        raise Preempted(start, saved=False)


def _keep_training(job: _Run, stepper: Stepper, evals: _InFlight) -> int:
    """In process, after the last scheduled step: extra steps while slower ranks finish."""
    sync, x = job.sync, job.total
    while True:
        t_poll = time.perf_counter()
        settled = sync.settle(x)
        sync.wait_s += time.perf_counter() - t_poll
        if settled:
            return x - job.total
        stepper.step(x)
        evals.complete(wait=False)
        x += 1


def _train_workers(job: _Run, ctx) -> float:
    """W spawned workers take node steps; this process supervises, averages and evaluates,
    handling events (blocking rounds, evaluations) in node-step order on every rank."""
    cfg, flat, rule, sync, spe, total = job.cfg, job.flat, job.rule, job.sync, job.spe, job.total
    w = cfg.workers
    job.stats.share_memory_()
    ctl = AtomicArray(NCTL)
    threads = w.threads_per_worker or max(1, job.rank_threads // w.workers)
    spec = WorkerSpec(
        cfg.to_dict(),
        job.launch,
        job.comm.rank,
        job.comm.size,
        job.data,
        flat.data,
        rule,
        ctl,
        job.stats,
        KEEP_GOING if cfg.sync.keep_training else total,
        threads,
        str(job.device),
        ctx.SimpleQueue(),
    )
    # The evaluation model: a private copy, filled from a snapshot of the shared one.
    shape, classes = job.data.input_shape, job.data.num_classes
    eval_flat = FlatModel(build_model(cfg.model.model, shape, classes), device=job.device)
    start, train_before = 0, 0.0
    if job.resumed is not None:  # model and counters; the workers' momentum starts afresh
        start, train_before = job.resumed["step"], job.resumed["train_s"]
        ctl.t[NEXT] = ctl.t[DONE] = start
    stop = sync.next_stop(0, 0.0)
    while stop is not None and stop <= start:
        stop = sync.next_stop(stop, stop / spe)
    pending = [e for e in job.evals if e > start]
    ck_at = job.ck.next_event(start)

    def limit() -> int:  # workers pause at blocking rounds, checkpoint checks, evaluations
        return min(x for x in (stop, ck_at, pending[0] if pending else None) if x is not None)

    paused_s = 0.0  # workers held for this rank's own evaluation pass: not training time
    evals = _InFlight()

    pool = WorkerPool(spec, w.workers, ctx)
    pool.start()
    try:
        pool.wait_ready()
        # The ranks start training together: spawning takes seconds, differently on each rank,
        # and a rank that started early would run its first steps (or, with --keep-training,
        # extra ones) alone.
        job.comm.barrier()
        _preempted_at_start(job, start)
        t0 = train_end = time.perf_counter()  # training time starts when all may step
        job.setup_s = t0 - job.t_start
        ctl[LIMIT].store(limit())
        pace = _Pace(cap=1e-3 if sync.overlaps else 2e-2)
        while True:
            pool.poll()
            check_finite(job.stats, cfg.run.max_nonfinite, cfg.optim.lr)
            event = min(x for x in (stop, ck_at, pending[0]) if x is not None)
            done = job.tracker.step = ctl[DONE].load()
            evals.complete(wait=False)
            if sync.overlaps:  # this process is the averager: rounds overlap the workers
                sync.poll(done, done / spe)
            if done < event:
                time.sleep(pace.nap(done, event - done))
                continue
            if event == stop:  # workers are held at the limit: nothing is in flight
                sync.step_done(stop, stop / spe)
                stop = sync.next_stop(stop, stop / spe)
            if event == pending[0]:
                if event == total and cfg.sync.keep_training:  # extra steps, past the limit
                    ctl[LIMIT].store(KEEP_GOING)
                    while not sync.settle(ctl[DONE].load()):
                        evals.complete(wait=False)
                        pool.poll()
                        time.sleep(pace.cap)
                    ctl[STOP].store(1)  # workers end the step they are in, then exit
                if event == total:  # every step is done; the workers' exit is not training
                    train_end = time.perf_counter()
                    pool.join()
                    job.extra = ctl[DONE].load() - total
                    sync.drain(total)  # wait for the other ranks' non-blocking rounds
                    sync.finish()  # publishes the rule's latest version, then averages
                # The workers are held at the evaluation step: the model evaluated is the one
                # after exactly ``event`` node steps. They resume once this rank's own pass is
                # done; the sum over the ranks (others may be behind) completes in the background.
                t_eval = time.perf_counter()
                rule.snapshot(eval_flat.params)
                eval_flat.data[flat.n_params :].copy_(flat.data[flat.n_params :])
                pending.pop(0)
                if not pending:  # the final evaluation: every earlier one completes first
                    evals.complete(wait=True)
                    job.evaluate_at(event, eval_flat.module)
                    return train_before + train_end - t0 - paused_s
                evals.add(job.evaluate_at(event, eval_flat.module, nonblocking=True))
                paused_s += time.perf_counter() - t_eval
            if event == ck_at:  # workers are held: the shared model is still
                save, halt = job.ck.at(event)
                if save and event < total:
                    evals.complete(wait=True)  # their rows belong in the checkpoint
                    sync.quiesce(event)
                    now = train_before + time.perf_counter() - t0
                    job.ck.save(event, job.state(event, now), job.launch.fault)
                    if halt:
                        raise Preempted(event)
                ck_at = job.ck.next_event(event)
            ctl[LIMIT].store(limit())  # release the workers
    finally:
        pool.stop()
        ctl.close()


class _InFlight:
    """Evaluations whose sum over the ranks is in flight (``evaluate_at(..., nonblocking=True)``
    handles), completed and recorded in the order they were posted, the same on every rank."""

    def __init__(self) -> None:
        self.handles: list[Callable[[bool], bool]] = []

    def add(self, complete: Callable[[bool], bool]) -> None:
        self.handles.append(complete)

    def complete(self, wait: bool) -> None:
        """Record those that finished (``wait``: all of them, blocking)."""
        while self.handles and self.handles[0](wait):
            self.handles.pop(0)


class _Pace:
    """How long the supervising loop may sleep before the next event.

    Polling at a fixed 0.2 ms woke this process 5,000 times a second on a node whose cores the
    workers need. The loop sleeps half the estimated time to the next event instead (seconds
    per node step as seen here, times the steps left), between 0.2 ms and ``cap``: 1 ms when
    this process drives overlapping rounds (their progress needs its polls), 20 ms otherwise.
    """

    def __init__(self, cap: float):
        self.cap, self.step_s = cap, 0.0
        self.at: tuple[int, float] | None = None  # (steps done, time) at the last change

    def nap(self, done: int, remaining: int) -> float:
        now = time.perf_counter()
        if self.at is None or done < self.at[0]:
            self.at = (done, now)
        elif done > self.at[0]:
            per = (now - self.at[1]) / (done - self.at[0])
            self.step_s = per if self.step_s == 0.0 else 0.8 * self.step_s + 0.2 * per
            self.at = (done, now)
        return min(self.cap, max(2e-4, 0.5 * remaining * self.step_s))


def _summarise(job: _Run, rows: list[dict], train_s: float, t_start: float, out: Path | None):
    cfg, comm, flat, sync, total = job.cfg, job.comm, job.flat, job.sync, job.total
    d, s = cfg.data, cfg.sync
    digest = bytes.fromhex(flat.checksum())
    sums = comm.allgather(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    finite = bool(torch.isfinite(flat.data).all())
    mine = [sync.wait_s, train_s, sync.inflight_s, job.extra, job.setup_s, float(finite)]
    waits = comm.allgather(torch.tensor(mine, dtype=torch.float64))
    bad = [r for r in range(comm.size) if not waits[r, 5]]
    if bad:  # a non-finite model is never written as the result
        raise DivergedError(
            f"the final model of rank(s) {', '.join(map(str, bad))} has non-finite parameters; "
            f"not written (lower --lr ({cfg.optim.lr:g}) or add --warmup-epochs)"
        )
    hosts = gather_hosts(comm, job.launch.hostname)
    groups = sync.groups() if isinstance(sync, HierAvg) else None  # collective: every rank
    all_stats = comm.allgather(job.stats)  # (ranks, W, NSTATS)
    extra = [round(float(x)) for x in waits[:, 3]]
    samples = (total * comm.size + sum(extra)) * d.batch_size
    train_s_max = float(waits[:, 1].max())
    summary = {
        "algo": s.algo,
        "update": cfg.workers.update,
        # worker processes per rank sharing its model through the update rule; 0: W = 1 steps
        # in the rank's own process, and no update rule is in play
        "worker_processes": cfg.workers.workers if spawns_workers(cfg) else 0,
        "comm": comm.name,
        "world_size": comm.size,
        "workers_per_rank": cfg.workers.workers,
        "dataset": d.dataset,
        "model": cfg.model.model,
        "epochs": cfg.run.epochs,
        "steps_per_rank": total,
        "extra_steps": extra,  # per rank, --keep-training: steps past total while others finished
        "samples_processed": samples,
        "wall_s": round(time.perf_counter() - t_start, 3),
        "hosts": hosts,  # per rank: where it ran
        # per rank: start-up (``run`` to the first training step: data, model, workers) and
        # training time (first step to last, without evaluation passes); samples_per_s uses the max
        "setup_s": [round(float(x), 3) for x in waits[:, 4]],
        "train_s": [round(float(x), 3) for x in waits[:, 1]],
        "samples_per_s": round(samples / train_s_max, 1) if train_s_max > 0 else None,
        "final_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "averaging_rounds": sync.rounds,
        # per rank: steps skipped for a non-finite loss or gradient (--max-nonfinite)
        "nonfinite_steps": [int(x) for x in all_stats[:, :, NONFINITE].sum(1)],
        "comm_wait_s": [round(float(x), 4) for x in waits[:, 0]],
        "comm_inflight_s": [round(float(x), 4) for x in waits[:, 2]],
        # share of the communication time hidden behind computation, per rank
        "comm_overlap": [
            round(max(0.0, 1 - float(w) / float(f)), 4) if f > 0 else None
            for w, f in zip(waits[:, 0], waits[:, 2], strict=True)
        ],
        "param_checksums": [bytes(row.tolist()).hex() for row in sums],
        "consensus": len({bytes(row.tolist()) for row in sums}) == 1,
        "workers": _worker_metrics(cfg, all_stats),
        "versions": metrics.versions(comm.name),
        "config": cfg.to_dict(),
    }
    if groups is not None:
        summary["groups"] = groups  # hier-avg: the world ranks each group averaged among
        summary["group_rounds"] = sync.group_rounds  # averaging_rounds counts the global ones
    if comm.rank == 0 and out:
        _write_outputs(out, job, summary)
    return summary


def _write_outputs(out: Path, job: _Run, summary: dict) -> None:
    """model.pt, then summary.json (its presence says the run completed), and metrics.jsonl
    once more. Should ``out`` fail now (full, gone, read-only), hours of training are not
    thrown away: the outputs go to a rescue folder and the error says where."""

    def write(folder: Path) -> None:
        metrics.save_model(folder / "model.pt", job.flat.module, job.cfg.to_dict())
        metrics.write_jsonl(folder / "metrics.jsonl", job.rows)
        metrics.write_json(folder / "summary.json", summary)

    try:
        write(out)
    except OSError as e:
        stamp = job.launch.slurm_job_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for base in (Path.cwd(), Path(tempfile.gettempdir())):
            rescue = base / f"hpc-asgd-rescue-{stamp}"
            try:
                write(rescue)
            except OSError:
                continue
            raise OutputError(
                f"could not write the outputs to {out} ({e.strerror or e}); "
                f"model.pt, metrics.jsonl and summary.json were saved to {rescue}"
            ) from e
        raise


def _worker_metrics(cfg: Config, st: torch.Tensor) -> dict:
    """Per-worker steps and the update rule's histograms, summed over ranks and workers."""
    from hpc_asgd.shm.base import HIST_BINS

    ints = lambda t: [int(v) for v in t.tolist()]  # noqa: E731
    out = {
        "steps": [ints(r) for r in st[:, :, STEPS]],  # [rank][worker]
        "applied": int(st[:, :, APPLIED].sum()),
        "dropped": int(st[:, :, DROPPED].sum()),
        "staleness_hist": ints(st[:, :, STALE0 : STALE0 + HIST_BINS].sum((0, 1))),
        "staleness_hist_bins": f"0..{HIST_BINS - 2}, >={HIST_BINS - 1} updates in between",
    }
    if cfg.workers.update == "leashed":
        out["cas_tries_hist"] = ints(st[:, :, TRIES0 : TRIES0 + HIST_BINS].sum((0, 1)))
        out["cas_tries_hist_bins"] = f"1..{HIST_BINS - 1}, >={HIST_BINS} tries"
    if cfg.workers.update == "locked":
        out["lock_wait_s"] = [[round(v, 4) for v in r.tolist()] for r in st[:, :, LOCK_WAIT]]
    return out
