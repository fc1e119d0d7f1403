"""Run under mpirun: properties of the asynchronous rounds. Exits non-zero on failure.

Usage: python tests/mpi/async_check.py ENGINE CHECK
  no-lost-update   a worker adds a known constant while a round is in flight; after the round
                   the model is exactly the average plus that constant
  groups           hier-avg's groups of S=2 at 4 ranks are [0, 1] and [2, 3]
"""

from __future__ import annotations

import sys

import torch
import torch.multiprocessing as mp
from torch import nn

from hpc_asgd import env
from hpc_asgd.comm import make_comm
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules import Hogwild, Leashed
from hpc_asgd.sync.hier_avg import make_group
from hpc_asgd.sync.rounds import AsyncRound

C = 0.5  # what the worker adds: exact in float32, as are the ranks' values and their mean


def _worker_adds(rule, n_params: int, go, done) -> None:
    rule.attach(0)
    go.wait(60)
    rule.read()
    rule.apply(torch.full((n_params,), -C), lr=1.0)  # p += C everywhere
    done.set()


def no_lost_update(engine: str, kind: str) -> None:
    comm = make_comm(engine, env.detect(), timeout=60.0)
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32)), shared=True)
    flat.data.fill_(float(comm.rank + 1))  # rank r holds r+1 everywhere
    rule = Hogwild(flat.params) if kind == "hogwild" else Leashed(flat.params, 1)
    rule.load(flat.params)
    ctx = mp.get_context("spawn")
    go, done = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_worker_adds, args=(rule, flat.n_params, go, done))
    worker.start()
    r = AsyncRound(comm.split(0, comm.rank), flat, rule)
    r.start(finished=True, step=0)  # snapshot x_s = r+1, allreduce posted
    go.set()  # the worker updates the live model while the round is in flight
    assert done.wait(60), "worker did not update"
    r.wait()
    assert r.apply()  # every rank flagged itself finished
    worker.join(30)
    rule.publish()
    mean = sum(range(1, comm.size + 1)) / comm.size
    params, buffers = flat.data[: flat.n_params], flat.data[flat.n_params :]
    assert torch.all(params == mean + C), (params.min(), params.max(), mean + C)
    assert torch.all(buffers == mean), (buffers.min(), buffers.max())  # no worker wrote them


def groups(engine: str) -> None:
    comm = make_comm(engine, env.detect(), timeout=60.0)
    group = make_group(comm, 2)
    lo = 2 * (comm.rank // 2)
    assert group.size == 2 and group.world_ranks == [lo, lo + 1], group.world_ranks


if __name__ == "__main__":
    engine, check = sys.argv[1], sys.argv[2]
    if check == "groups":
        groups(engine)
    else:
        no_lost_update(engine, check.split(":")[1])
    print(f"OK {check}", flush=True)
