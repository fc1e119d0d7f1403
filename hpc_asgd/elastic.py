"""``--min-ranks``: keep training when ranks die: shrink the job and continue (MPI with ULFM).

Open MPI's ULFM (``mpirun --with-ft ulfm``) reports a dead rank to the survivors as an error of
the collective they are in (``PeerLost``) instead of ending the job. The survivor that sees it
first revokes every communicator of its process, so that each other survivor's collective ends
with the same error wherever it is (a round, an evaluation's sum, a checkpoint's barrier), and
every survivor calls :func:`recover`, collective over the survivors:

1. **Membership.** ULFM's ``MPI_Comm_shrink`` gives every survivor the same communicator: the
   members are agreed by ULFM's own fault-tolerant consensus among the survivors, so two
   survivors never go on in different worlds, and no coordinator can die with a rank (rank 0
   included: the lowest surviving rank becomes rank 0 and writes the outputs). A cut link
   looks like dead peers to both of its sides, so the survivors go on only if they are a
   strict majority of the last membership: of two sides at most one can be, the other stops
   (as it also does when half the ranks or more die at once).
2. **The round in flight is abandoned** on every survivor (its partial result, wherever one
   arrived, is dropped with the revoked communicator) and replaced by a recovery round: the
   exact average of the survivors' models, parameters and buffers, then rank 0's bits; every
   survivor goes on from it. An outer optimizer's global model restarts from that average, its
   momentum averaged over the survivors; a 16-bit payload's error feedback restarts at zero.
3. **The dead ranks' work.** Their steps up to the last round that a survivor completed are in
   the survivors' models and count for the job (``credited_steps``); the steps they took after
   it are lost (``steps_lost``: exact for the blocking synchronisers, who meet at fixed steps;
   for the non-blocking ones the survivors' mean steps since that round, an estimate).
4. **The schedule.** The survivors take the dead ranks' remaining steps: a blocking
   synchroniser's ranks all go on from the furthest survivor's node step ``s`` with
   ``(total - s) x old world / new world`` steps each; under ``--budget job`` the job's summed
   budget stays what it was and the survivors' rounds count it, with the dead ranks' credited
   steps in it. The remaining evaluations are stretched the same way; an evaluation whose sum
   was in flight is lost. The data are re-sharded over the survivors (fewer, larger shards), at
   the same point of the epochs; the LR schedule goes on where the job was.
5. **Rebuilt**: the synchroniser (its sub-communicators, its schedule), the evaluation's and
   the checkpoints' communicator. Each loss is a row of ``summary.json``'s ``membership``.
   With W workers (``loops.train_workers``) the rank's workers are held between steps while
   this runs (nothing writes the shared model) and W new ones start on the new shard; their
   optimizer states start afresh, as on a resume.

Fewer than ``--min-ranks`` survivors, or not a majority, ends the job with one line from every
survivor (``TooFewRanks``: each exits by itself, since all of them know); a loss during the
final summary ends it as without ``--min-ranks``. Engines: MPI with ULFM only (Gloo, NCCL,
Horovod: refused with one line).
"""

from __future__ import annotations

import math
import sys
import time

import torch

from hpc_asgd import joiners
from hpc_asgd.config import Config, shares_budget
from hpc_asgd.driver import Events, Job
from hpc_asgd.env import Launch
from hpc_asgd.errors import ConfigError, PeerLost, TooFewRanks
from hpc_asgd.step import Stepper
from hpc_asgd.sync import make_synchronizer

# the synchronisers whose rebuild on the survivors is implemented and tested (a plug-in is not)
SUPPORTED = ("lasgd", "local-async", "local-sgd", "hier-avg", "sync", "none")


def wanted(cfg: Config, world_size: int) -> bool:
    """Whether a lost rank is survived: ``--min-ranks`` below the world size."""
    return 0 < cfg.run.min_ranks < world_size


def check(cfg: Config, launch: Launch) -> None:
    """``--min-ranks``'s rules, before any engine starts (ConfigError: one line, exit 2)."""
    if not wanted(cfg, launch.size):
        return
    from hpc_asgd.comm import resolve_engine

    engine = resolve_engine(cfg.run.comm, launch)
    if engine != "mpi":
        raise ConfigError(
            f"min_ranks: shrinking a job needs MPI with ULFM (--comm mpi under mpirun "
            f"--with-ft ulfm); the {engine!r} engine cannot survive a lost rank here"
        )
    if not launch.ulfm:
        raise ConfigError(
            "min_ranks: MPI's fault tolerance is off, so a lost rank ends the job: start it "
            "with mpirun --with-ft ulfm (Open MPI 5; it sets OMPI_MCA_mpi_ft_enable=1)"
        )
    if cfg.sync.algo not in SUPPORTED:
        raise ConfigError(
            f"min_ranks: not yet for --algo {cfg.sync.algo}; shrinking is implemented for "
            f"{', '.join(SUPPORTED)}"
        )
    joiners.check(cfg, launch)
    if cfg.sync.algo == "hier-avg" and (cfg.sync.hier_mode != "blocking" or cfg.sync.group_size):
        raise ConfigError(
            "min_ranks: hier-avg is rebuilt on the survivors with blocking rounds and node "
            "groups only (--hier-mode blocking, --group-size 0: groups re-formed from the "
            "hosts left; a fixed size need not divide the survivors)"
        )


def _credit(job: Job) -> list[float]:
    """This rank's view of the rounds, for the dead ranks' credit: [rounds completed, the
    last completed round's sum of node steps, this rank's part in it, its part in the round
    in flight (-1: none), the node step of its last completed blocking round]."""
    sync, b = job.sync, job.sync.budget
    r = getattr(sync, "round", None)  # a non-blocking stream (lasgd)
    done = float(r.rounds if r is not None else sync.rounds)
    inflight = float(r.at_post) if r is not None and r.busy else -1.0
    return [done, b.seen, float(b.at_post), inflight, float(getattr(sync, "last_round", 0))]


def recover(
    job: Job, err: PeerLost, step: int, events: Events, stepper: Stepper | None
) -> tuple[int, Events]:
    """Shrink to the survivors and rebuild the job on them (see the module's docstring);
    collective over the survivors. ``step``: this rank's node steps taken; ``stepper``: the
    rank's own (W = 1), resharded here, or None (the workers are restarted on ``job.step``
    by the caller, held between steps meanwhile). Returns the node
    steps to go on from (the same on every survivor for a blocking synchroniser) and the
    events ahead (the same on every survivor)."""
    t0 = time.perf_counter()
    cfg, old, flat, rule = job.cfg, job.comm, job.flat, job.rule
    if not (wanted(cfg, old.size) or job.membership) or not hasattr(old, "shrink"):
        raise err
    old.revoke_all()  # type: ignore[attr-defined]
    new = old.shrink()  # type: ignore[attr-defined]
    lost = [r for r in old.world_ranks if r not in new.world_ranks]
    hosts = old.hosts  # type: ignore[attr-defined]
    who = ", ".join(f"{r} ({hosts[r]})" for r in lost)
    if not lost:  # revoked without a failure: not ours to repair
        raise err
    if new.size < cfg.run.min_ranks:
        raise TooFewRanks(
            f"lost rank(s) {who}: {new.size} rank(s) left, fewer than --min-ranks "
            f"{cfg.run.min_ranks} ({err})"
        )
    if 2 * new.size <= old.size:  # no split brain: a cut link looks like dead peers to both sides
        raise TooFewRanks(
            f"lost rank(s) {who}: {new.size} of {old.size} rank(s) left, not a majority: "
            f"the others may live on behind a cut link, so these stop rather than train as "
            f"a second job ({err})"
        )
    # ---- agree on where the job stands --------------------------------------------------
    ck = job.ck
    consumed = max([e for e in job.evals if e not in events.evals], default=0)
    mine = [float(step), float(consumed), float(ck.next_check), *_credit(job)]
    table = new.allgather(torch.tensor(mine, dtype=torch.float64))  # (survivors, 8)
    steps = [int(x) for x in table[:, 0]]
    s_star = max(steps)
    blocking = not job.sync.overlaps
    go_on = s_star if blocking else step
    done = table[:, 3]
    r_max = float(done.max())
    if shares_budget(cfg, old.size):
        top = int(torch.argmax(done))
        parts = torch.where(done == r_max, table[:, 5], table[:, 6].clamp(min=0))
        # the last round's sum holds the earlier losses' credit too
        credited = float(table[top, 4]) - float(parts.sum()) - job.sync.budget.credit
        since = float((table[:, 0] - parts).mean())
        steps_lost = len(lost) * since
    else:  # the blocking rounds: the dead ranks' steps up to the last one are in the models
        per = float(table[:, 7].max())
        credited, steps_lost = len(lost) * per, len(lost) * (s_star - per)
    # ---- the recovery round: every survivor goes on from the survivors' exact average ------
    rule.publish()
    new.allreduce_(flat.data)
    flat.data.div_(new.size)
    new.bcast_(flat.data, root=0)
    rule.load(flat.params)
    # ---- the schedule: the survivors take the dead ranks' remaining steps ----------------
    old_total = job.total
    stretch = old.size / new.size

    def later(e: int) -> int:
        return s_star + math.ceil((e - s_star) * stretch)

    # past the furthest survivor, so that every survivor meets the final events again
    job.total = max(later(old_total), max(steps) + 1)
    left = sorted({later(e) for e in job.evals if e > max(s_star, consumed)} | {job.total})
    job.evals = [e for e in job.evals if e <= consumed] + left
    # ---- rebuild on the survivors ---------------------------------------------------------
    # the new shard (the steps keep their first rank's augmentation stream and faults)
    job.step = job.step.resharded(new.rank, new.size, go_on, job_budget=bool(job.sync.budget.steps))
    job.spe = job.step.sampler().steps_per_epoch
    old_sync = job.sync
    state = {k: v for k, v in old_sync.state_dict().items() if k != "payload"}
    sync = make_synchronizer(cfg, new, flat, rule, job.spe)  # takes rank 0's bits again
    sync.load_state_dict(state)
    sync.wait_s = old_sync.wait_s
    outer = getattr(sync, "outer", None)
    if outer is not None:  # the global model restarts from the average
        v = None if outer.v is None else outer.v.clone()
        outer.start(flat.params)
        if v is not None:
            new.allreduce_(v)
            outer.v = v.div_(new.size)
    # every survivor counts the same rounds from here (one may have completed one more)
    sync.rounds = int(r_max)
    stream = getattr(sync, "round", None)  # lasgd's round stream
    if stream is not None:
        stream.rounds = int(r_max)
    sync.last_round = s_star
    b, ob = sync.budget, old_sync.budget
    b.offset = ob.offset  # the stepper reads this shared array
    b.deadline = ob.deadline
    if ob.ended_by == "time":
        b.exhausted, b.ended_by = True, "time"
    if ob.steps:  # the job's budget: the survivors' steps and the dead ranks' credit
        b.steps, b.world, b.credit = ob.steps, new.size, ob.credit + credited
        b.record(float(table[:, 0].sum()), step)  # as a round of the survivors would
    job.extra = 0  # recounted against the new schedule
    job.sync, job.comm = sync, new
    ev = job.evaluator
    ev.comm, ev.spe, ev.job_epochs = new, job.spe, True
    ev.handles.clear()  # sums in flight on the revoked communicator: those rows are lost
    ck.comm = new
    ck.next_check = max(int(table[:, 2].max()), s_star + 1)
    ahead = Events(job, go_on)  # the synchroniser's clock resumes at this rank's step
    ahead.evals, ahead.ck_at = left, ck.next_event(s_star)
    job.progress.total, job.progress.spe = job.total, job.spe
    if stepper is not None:  # W = 1; the workers' loop starts new workers on job.step
        stepper.reshard(job.step)
        if sync.averages_gradients:
            stepper.grads_hook = sync.grads_ready
    recovery_s = time.perf_counter() - t0
    job.membership.append(
        {
            "time_s": round(time.perf_counter() - job.t_start, 3),
            "node_step": s_star,
            "left": lost,
            "hosts": [hosts[r] for r in lost],
            "joined": [],
            "world_size": new.size,
            "credited_steps": round(credited, 1),
            "steps_lost": round(steps_lost, 1),
            "steps_per_rank": job.total,
            "recovery_s": round(recovery_s, 3),
            "resumed_unix": round(time.time(), 3),  # a benchmark's clock: kill to training
        }
    )
    if new.rank == 0:
        print(
            f"hpc-asgd: warning: lost rank(s) {who} at node step {s_star}: {new.size} ranks go "
            f"on (--min-ranks {cfg.run.min_ranks}), {job.total} steps each, after "
            f"{recovery_s:.2f} s ({' '.join(str(err).split())})",
            file=sys.stderr,
            flush=True,
        )
    if joiners.wanted(job):  # --max-ranks: replacements join (blocking: go_on is everyone's)
        ahead = joiners.grow(job, go_on, ahead, stepper)
    return go_on, ahead
