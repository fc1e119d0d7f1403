"""``--max-ranks M``: replacements for lost ranks join the running job from a live peer.

After a loss that the job survives (``--min-ranks``, :func:`hpc_asgd.elastic.recover`), the
survivors start replacements until the job has M ranks again (at most its first size):

1. **Started by the survivors**: ULFM's shrunk communicator spawns them (``MPI_Comm_spawn`` of
   this process's own command line with ``--join``, on mpirun's free slots: the allocation's
   cores that the dead ranks left) and merges them in after the survivors
   (``comm.mpi.MpiComm.spawn``, ``comm.mpi.join``). Each takes the lowest job-wide rank that
   no survivor holds (a lost one's), and the survivors' table of status addresses and the
   job's token, so that deadlines name ranks and hosts as before.
2. **Where the job stands, from rank 0** (:func:`_share`): the node step every survivor is at
   (the blocking synchronisers meet at the same one), the schedule on the larger world (the
   remaining steps shared by more ranks: ``(total - s) x old / new`` each; the remaining
   evaluations moved the same way), the synchroniser's state (its rounds), the point of the
   data's epochs, the checkpoint checks, the membership log. Plain containers and tensors,
   loaded with ``weights_only=True``. Every member, survivors included, takes rank 0's copy.
3. **The model, from rank 0 too**: the synchroniser is rebuilt on the new communicator, which
   gives every member rank 0's bits (parameters and buffers), and the data are re-sharded
   over the members at the same point of the epochs. The replacement's optimizer state
   starts afresh (as a resumed worker's does); the survivors keep theirs.
4. **Then all train on** from that node step, and the job ends in consensus over every member.
   ``summary.json``'s ``membership`` gets a row with ``joined`` (the job-wide ranks) and
   ``join_s`` (from the spawn to training again: the replacement's start-up, its data and
   model, and the hand-over).

Supported: MPI with ULFM under ``mpirun``, W = 1, the blocking synchronisers (local-sgd,
hier-avg blocking, sync, none). Refused with one line: srun (Slurm's PMIx plugin has no
``MPI_Comm_spawn``), W workers, lasgd and local-async (their job budget counts every rank's
node steps, and a newcomer's are not placed in it yet), an outer optimizer (its global model
and momentum are not handed over yet).
"""

from __future__ import annotations

import io
import math
import sys
import time

import torch

from hpc_asgd.comm import Comm
from hpc_asgd.config import Config
from hpc_asgd.driver import Events, Job
from hpc_asgd.env import Launch
from hpc_asgd.errors import ConfigError
from hpc_asgd.step import Stepper, augment_seed
from hpc_asgd.sync import make_synchronizer

JOINABLE = ("local-sgd", "hier-avg", "sync", "none")
MAX_STATE_BYTES = 64 << 20  # a hand-over larger than this is not one of ours


def check(cfg: Config, launch: Launch) -> None:
    """``--max-ranks``'s rules, before any engine starts (``elastic.check`` calls this)."""
    if not cfg.run.max_ranks or launch.joining:
        return
    from hpc_asgd.train import spawns_workers

    if launch.launcher != "mpirun":
        raise ConfigError(
            f"max_ranks: replacements are started with MPI_Comm_spawn, which mpirun offers; "
            f"under {launch.launcher} they cannot be (Slurm's PMIx plugin has no spawn: use "
            "LAUNCHER=mpirun in the templates)"
        )
    if cfg.sync.algo not in JOINABLE:
        raise ConfigError(
            f"max_ranks: replacements join {', '.join(JOINABLE)}; --algo {cfg.sync.algo}'s "
            "job budget counts every rank's node steps, and a newcomer's are not placed in it "
            "yet"
        )
    if spawns_workers(cfg):
        raise ConfigError("max_ranks: replacements join ranks of W = 1; drop --workers")
    if cfg.sync.outer_lr != 1.0 or cfg.sync.outer_momentum:
        raise ConfigError(
            "max_ranks: an outer optimizer's global model and momentum are not handed to a "
            "replacement yet; drop --outer-lr / --outer-momentum"
        )


def wanted(job: Job) -> int:
    """How many replacements the survivors start now (0: none)."""
    if not job.cfg.run.max_ranks:
        return 0
    return max(0, min(job.world_size_start, job.cfg.run.max_ranks) - job.comm.size)


def grow(job: Job, step: int, events: Events, stepper: Stepper | None) -> Events:
    """On the survivors, right after a shrink at node step ``step`` (the same on each):
    start the replacements, hand them the job and go on over every member. Collective over
    the survivors, then over the members. Returns the events ahead."""
    n = wanted(job)
    if not n:
        return events
    t0 = time.perf_counter()
    old = job.comm
    merged = old.spawn(n, [*job.launch.command, "--join"])  # type: ignore[attr-defined]
    joined = merged.world_ranks[old.size :]
    # ---- the schedule on more ranks: the remaining steps shared ------------------------------
    share = old.size / merged.size

    def later(e: int) -> int:
        return step + math.ceil((e - step) * share)

    left = sorted({later(e) for e in events.evals} | {later(job.total)})
    state: dict | None = None
    if merged.rank == 0:
        row = {
            "node_step": step,
            "left": [],
            "hosts": [merged.hosts[r] for r in joined],  # type: ignore[attr-defined]
            "joined": joined,
            "world_size": merged.size,
            "credited_steps": 0.0,
            "steps_lost": 0.0,
            "steps_per_rank": later(job.total),
        }
        state = {
            "step": step,
            "total": later(job.total),
            "evals": [e for e in job.evals if e <= step] + left,
            "at": job.step.epochs_at(step),
            "sync": {k: v for k, v in job.sync.state_dict().items() if k != "payload"},
            "rounds": job.sync.rounds,
            "next_check": max(job.ck.next_check, step + 1),
            "membership": [*job.membership, row],
            "world_size_start": job.world_size_start,
            "total_start": job.total_start,
        }
    shared = _share(merged, state)
    old_sync = job.sync
    _adopt(job, merged, shared, rebuild=True)
    sync = job.sync
    sync.wait_s = old_sync.wait_s
    sync.budget.offset = old_sync.budget.offset  # the stepper reads this shared array
    sync.budget.deadline = old_sync.budget.deadline
    if stepper is not None:
        stepper.reshard(job.step)
        if sync.averages_gradients:
            stepper.grads_hook = sync.grads_ready
    job.ck.comm = job.evaluator.comm = merged
    job.evaluator.spe = job.spe
    ahead = Events(job, step)
    job.progress.total, job.progress.spe = job.total, job.spe
    join_s = time.perf_counter() - t0
    job.membership.append(
        {
            "time_s": round(time.perf_counter() - job.t_start, 3),
            **shared["membership"][-1],
            "join_s": round(join_s, 3),
            "resumed_unix": round(time.time(), 3),  # a benchmark's clock
        }
    )
    if merged.rank == 0:
        print(
            f"hpc-asgd: warning: rank(s) {', '.join(map(str, joined))} joined at node step "
            f"{step}: {merged.size} ranks go on, {job.total} steps each, after {join_s:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return ahead


def receive(comm: Comm) -> dict:
    """On a replacement, right after it joined: where the job stands (:func:`grow`)."""
    return _share(comm, None)


def adopt_on_joiner(job: Job, state: dict) -> None:
    """On a replacement (its synchroniser made by ``train.run`` on the job's communicator):
    the job's schedule, the synchroniser's state and the checks from rank 0's; it then trains
    from ``state["step"]`` (the loop's resume path, with a fresh optimizer)."""
    _adopt(job, job.comm, state, rebuild=False)
    job.membership = list(state["membership"])
    job.world_size_start, job.total_start = state["world_size_start"], state["total_start"]
    job.evaluator.job_epochs = True
    job.progress.total, job.progress.spe = job.total, job.spe
    job.resumed = {
        "step": state["step"],
        "train_s": 0.0,
        "optimizer": None,
        "generator": torch.Generator()
        .manual_seed(augment_seed(job.cfg.run.seed, job.launch.rank, 0))
        .get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def _adopt(job: Job, comm: Comm, state: dict, rebuild: bool) -> None:
    """Every member: the schedule, the shard and the synchroniser on ``comm``, rebuilt there
    by the survivors (``rebuild``: collective; it gives every member rank 0's model) and by
    the replacement's own start-up (``train.run``: the same collectives, in the same order)."""
    step = int(state["step"])
    job.total, job.evals = int(state["total"]), [int(e) for e in state["evals"]]
    job.step = job.step.placed(comm.rank, comm.size, step, float(state["at"]), job_budget=False)
    job.spe = job.step.sampler().steps_per_epoch
    sync = make_synchronizer(job.cfg, comm, job.flat, job.rule, job.spe) if rebuild else job.sync
    sync.load_state_dict(state["sync"])
    sync.rounds, sync.last_round = int(state["rounds"]), step
    job.sync, job.comm = sync, comm
    job.ck.next_check = int(state["next_check"])
    job.extra = 0


def _share(comm: Comm, state: dict | None) -> dict:
    """Rank 0's ``state`` on every member: ``torch.save``'s bytes, broadcast (length first),
    loaded with ``weights_only=True`` (tensors and plain containers only)."""
    if comm.rank == 0:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    comm.bcast_(size, root=0)
    n = int(size.item())
    if not 0 < n <= MAX_STATE_BYTES:
        raise ValueError(f"join: a hand-over of {n} bytes (at most {MAX_STATE_BYTES})")
    if comm.rank != 0:
        data = torch.empty(n, dtype=torch.uint8)
    comm.bcast_(data, root=0)
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)
