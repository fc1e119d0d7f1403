"""torch.distributed (Gloo) peers: one rank of a training job, and one model-averaging round.

``compare.py`` runs ``mpirun -n R python benchmarks/peers/ddp.py NAME JSON`` (rank and size
from Open MPI's variables, rendezvous from MASTER_ADDR / MASTER_PORT) with NAME torch-ddp
(DDP + SGD), torch-postlocal (DDP + post_localSGD_hook + PostLocalSGDOptimizer with a
PeriodicModelAverager of period K) or torch-hier (the same hook, then a
HierarchicalModelAverager {K1: S, K: ranks} after every step), with hpc_asgd's model, data,
SGD, evaluation schedule and straggler rule. Communication time: DDP's allreduce hook timed
from launch to completion, or the ``average_parameters`` calls. Rank 0 prints the result.
``averager_round`` is ``allreduce.py``'s torch-averager.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

MARK = "COMPARE_PEER_JSON "


def eval_steps(total: int, spe: int, eval_every: float) -> list[int]:
    """The node steps after which to evaluate: as ``hpc_asgd.train.run`` chooses them."""
    every = max(1, round(eval_every * spe))
    return [*range(every, total, every), total]


def eval_row(module, data, test, step: int, loss_sum: float, seen: list, t0: float, spe: int,
             batch: int, world: int) -> dict:  # fmt: skip
    """One row of hpc_asgd's metrics.jsonl: this rank's ``module`` on its test shard (``test``,
    a ShardSampler), summed over the ranks (the default group); the train loss since the last
    row, whose [loss sum, steps] ``seen`` holds and this updates."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    acc = torch.zeros(5, dtype=torch.float64)
    module.eval()
    with torch.no_grad():
        for idx in test.epoch(0):
            x, y = data.test.batch(idx, train=False)
            out = module(x)
            acc[0] += (out.argmax(1) == y).sum().item()
            acc[1] += F.cross_entropy(out, y, reduction="sum").item()
            acc[2] += y.numel()
    module.train()
    acc[3], acc[4] = loss_sum - seen[0], step - seen[1]
    seen[0], seen[1] = loss_sum, step
    dist.all_reduce(acc)
    return {
        "epoch": round(step / spe, 4), "time_s": round(time.perf_counter() - t0, 3),
        "samples": step * batch * world, "train_loss": float(acc[3] / max(float(acc[4]), 1)),
        "test_acc": float(acc[0] / acc[2]), "test_loss": float(acc[1] / acc[2]),
    }  # fmt: skip


def averager_round(model_name: str, shape, classes: int, n: int, seed: int):
    """``PeriodicModelAverager(period=1, warmup_steps=0).average_parameters`` on the model
    (the default process group must be up); returns (round, the model's parameters)."""
    import torch
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from hpc_asgd.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, shape, classes)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == n, f"{model_name} is not {n} parameters"
    for p in params:  # torch averages only parameters that have a grad,
        p.grad = torch.zeros_like(p)  # as they do after a training step's backward
    averager = PeriodicModelAverager(period=1, warmup_steps=0)
    return lambda: averager.average_parameters(model.parameters()), params


def peer_delays(opts: dict, rank: int):
    """compare.py's ``--delay`` / ``--pause-at`` variants: hpc_asgd's own delay model."""
    from hpc_asgd.delays import Delays, parse_delay

    dist, mean_s, sigma = parse_delay(opts.get("delay", "")) or (None, 0.0, 0.0)
    pausing = opts.get("pause_rank", -1) == rank
    if dist is None and not pausing:
        return None
    at, pause = (opts["pause_at"], opts["pause_s"]) if pausing else (0, 0.0)
    return Delays(dist, mean_s, sigma, opts["seed"], rank, 0, at, pause)


def train_rank(name: str, opts: dict) -> None:
    from collections import OrderedDict

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.distributed.algorithms.model_averaging import averagers
    from torch.distributed.algorithms.model_averaging import utils as avg_utils
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager,
    )
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from hpc_asgd.data import ShardSampler, load_dataset
    from hpc_asgd.models import build_model

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(opts["threads"] or max(1, cores // local))  # as hpc_asgd's ranks
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    t_start = time.perf_counter()  # as hpc_asgd.train.run's clock: the engine is up

    data = load_dataset(opts["dataset"], opts["data_dir"])
    torch.manual_seed(opts["seed"])
    model = build_model(opts["model"], data.input_shape, data.num_classes)
    comm_s = [0.0]

    def timed_allreduce(state, bucket):  # DDP's default hook, timed launch -> completion
        t0 = time.perf_counter()

        def done(fut):
            comm_s[0] += time.perf_counter() - t0
            return fut.value()

        return allreduce_hook(state, bucket).then(done)

    def timed_call(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                comm_s[0] += time.perf_counter() - t0

        return wrapper

    net = DistributedDataParallel(model)  # broadcasts rank 0's parameters
    k, k1 = opts["period"], opts["local_period"]
    opt = torch.optim.SGD(net.parameters(), lr=opts["lr"], momentum=opts["momentum"])
    averager = None
    if name == "torch-ddp":
        net.register_comm_hook(None, timed_allreduce)
    else:
        state = PostLocalSGDState(
            process_group=None,
            subgroup=None,
            start_localSGD_iter=0,
            post_local_gradient_allreduce=False,  # no intra-"node" gradient allreduce
        )
        net.register_comm_hook(state, post_localSGD_hook)
        if name == "torch-postlocal":
            avg = averagers.PeriodicModelAverager(period=k, warmup_steps=0)
            avg.average_parameters = timed_call(avg.average_parameters)
            opt = PostLocalSGDOptimizer(optim=opt, averager=avg)
        else:  # torch-hier: groups of S ranks every K1 steps, everyone every K steps
            averager = HierarchicalModelAverager(
                period_group_size_dict=OrderedDict([(k1, opts["group_size"]), (k, world)]),
                warmup_steps=0,
            )
            averager.average_parameters = timed_call(averager.average_parameters)

    batch = opts["batch_size"]
    sampler = ShardSampler(len(data.train), rank, world, batch, opts["seed"])
    spe = sampler.steps_per_epoch
    total = max(1, math.ceil(opts["epochs"] * spe))
    pending = eval_steps(total, spe, opts["eval_every"])
    gen = torch.Generator().manual_seed(opts["seed"] * 7919 + rank)
    slow = opts["slow_factor"] if rank == opts["slow_rank"] else 1.0
    delays = peer_delays(opts, rank)
    test = ShardSampler(len(data.test), rank, world, 512, 0, shuffle=False, drop_last=False)
    rows: list[dict] = []
    seen = [0.0, 0]  # train-loss sum and steps at the last evaluation
    loss_sum = 0.0

    def evaluate(step: int, module: torch.nn.Module) -> None:
        rows.append(eval_row(module, data, test, step, loss_sum, seen, t_start, spe, batch, world))

    net.train()
    dist.barrier()
    t_train0 = t_seg = time.perf_counter()
    train_s = 0.0
    batches: list = []
    for s in range(total):
        t0 = time.perf_counter()
        e, i = divmod(s, spe)
        if i == 0:
            batches = sampler.epoch(e)
        x, y = data.train.batch(batches[i], train=True, gen=gen)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().item()
        if slow > 1:  # straggler: sleep in proportion to the measured step time
            time.sleep((slow - 1) * (time.perf_counter() - t0))
        if delays is not None:  # random delays and the one-off pause, as hpc_asgd's steps
            delays.after(s)
        if averager is not None:
            averager.average_parameters(net.parameters())
        if s + 1 == pending[0]:
            train_s += time.perf_counter() - t_seg
            if s + 1 == total and name != "torch-ddp":  # a consensus model, as ours ends
                timed_call(avg_utils.average_parameters)(iter(net.parameters()), None)
            evaluate(pending.pop(0), net.module)
            t_seg = time.perf_counter()

    mine = torch.tensor([train_s, comm_s[0], t_train0 - t_start], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if rank == 0:
        per_rank = [t.tolist() for t in every]
        train = [r[0] for r in per_rank]
        samples = total * batch * world
        out = {
            "steps_per_rank": total,
            "samples_processed": samples,
            "samples_per_s": samples / max(train),
            "train_s_per_rank": train,
            "comm_wait_s": [r[1] for r in per_rank],
            "setup_s": per_rank[0][2],
            "wall_s": time.perf_counter() - t_start,
            "final_test_acc": rows[-1]["test_acc"],
            "rows": rows,
            "torch_threads": torch.get_num_threads(),
            "hosts": hosts,
        }
        print(MARK + json.dumps(out), flush=True)
    # The all_gather was the last collective. Leave without destructors: torch 2.13 can
    # deadlock tearing down DDP's reducer (its Gloo thread waits for the GIL that the
    # joining main thread holds); it hung a straggler run of torch-ddp here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hpc_asgd
    train_rank(sys.argv[1], json.loads(sys.argv[2]))
