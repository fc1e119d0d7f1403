"""One rank of ``api_loop.py``: every contender's training, in the same plain loop.

``api_loop.py`` runs ``mpirun -n 2 python benchmarks/peers/api_loop_rank.py NAME JSON`` with NAME

- ``none``: no synchroniser at all (plain torch; the ranks never talk to each other);
- ``ours-ALGO-ENGINE``: ``hpc_asgd.init(ENGINE)`` and ``hpc_asgd.LASGD`` / ``LocalAsync`` /
  ``LocalSGD`` over the model and optimizer, as in ``examples/own_loop.py``;
- ``torch-postlocal``: ``PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=K,
  warmup_steps=0))`` over a Gloo process group (rendezvous from MASTER_ADDR / MASTER_PORT);
- ``torchft-localsgd``: torchft's ``LocalSGD(manager, model, opt, sync_every=K)``, each rank
  a replica group of one process (its own TCPStore, ``ProcessGroupGloo``), joining the
  lighthouse that the driver started (``JSON["lighthouse"]``).

The model, data, shard of each rank, batch, AdamW and torch threads are ``examples/own_loop.py``'s
(``WaveNet``, ``waveforms``). Each rank times its loop from the first step to the end of the last
one, with the synchroniser's end where it has one (ours: leaving the ``with`` block, which drains
the rounds and takes the final exact average; torch: a final ``average_parameters``; torchft:
its last sync, at step ``steps``, a multiple of K). What a contender does before the loop is not
timed: starting the engine, the first collective (ours: the constructor's broadcast of rank 0's
model; torch: the same broadcast; torchft: one ``sync()``, whose first quorum configures its
process group). Each rank prints one line, MARK + JSON: its node steps, training seconds, test
accuracy of its own final model, rounds and seconds spent in the synchroniser's communication.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

MARK = "API_LOOP_RANK "


def setup(opts: dict, rank: int, world: int):
    """The example's data, model and AdamW; the DataLoader over this rank's shard."""
    import torch
    from torch.utils.data import DataLoader

    from examples.own_loop import WaveNet, waveforms
    from hpc_asgd import ShardSampler

    torch.set_num_threads(1)
    train = waveforms(opts["samples"], opts["classes"], seed=opts["seed"])
    test = waveforms(2048, opts["classes"], seed=opts["seed"] + 1)
    torch.manual_seed(opts["seed"])  # the same initial model on every rank
    model = WaveNet(opts["classes"], opts["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=1e-4)
    sampler = ShardSampler(len(train), rank, world, opts["batch_size"], opts["seed"])
    return model, opt, DataLoader(train, batch_sampler=sampler), test


def epochs(loader, steps: int):
    """The loader's batches, epoch after epoch (reshuffled), for ``steps`` steps: what
    ``Averaging.iterate`` yields, for the contenders that have no such helper."""
    n = epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for item in loader:
            if n == steps:
                return
            n += 1
            yield item
        epoch += 1


def train(model, opt, batches) -> int:
    """THE loop, the same for every contender: returns the steps taken."""
    import torch.nn.functional as F

    model.train()
    n = 0
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # ours, torch's and torchft's synchronisers hook on (or wrap) this step
        n += 1
    return n


def accuracy(model, data) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return float((model(x).argmax(1) == y).float().mean())


def timed(fn, spent: list[float]):
    """``fn`` that adds its seconds to ``spent[0]`` and its calls to ``spent[1]``."""

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    return wrapper


class Clock:
    """The loop's wall time and this process's CPU time (every thread of it) since creation."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        return {"train_s": time.perf_counter() - self.t0, "cpu_s": time.process_time() - self.c0}


def mpi_rank() -> tuple[int, int]:
    return int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])


def run_none(opts: dict) -> dict:
    rank, world = mpi_rank()
    model, opt, loader, test = setup(opts, rank, world)
    clock = Clock()
    steps = train(model, opt, epochs(loader, opts["steps"]))
    return {"rank": rank, "steps": steps, **clock.stop(), "acc": accuracy(model, test),
            "rounds": 0}  # fmt: skip


def run_ours(opts: dict, algo: str, engine: str) -> dict:
    import hpc_asgd

    comm = hpc_asgd.init(engine, timeout=opts["timeout"])
    model, opt, loader, test = setup(opts, comm.rank, comm.size)
    cls = {"lasgd": hpc_asgd.LASGD, "local-async": hpc_asgd.LocalAsync,
           "local-sgd": hpc_asgd.LocalSGD}[algo]  # fmt: skip
    # the constructor broadcasts rank 0's model (a collective: the ranks start together)
    avg = cls(model, opt, comm, period=opts["period"], steps=opts["steps"])
    clock = Clock()
    with avg:
        train(model, opt, avg.iterate(loader))
    timing = clock.stop()  # with the drain and the final exact average
    stats = avg.stats()
    return {"rank": comm.rank, "steps": stats["steps"], **timing,
            "acc": accuracy(model, test), "rounds": stats["rounds"],
            "comm_s": stats["comm_wait_s"], "stats": stats, "engine": comm.name}  # fmt: skip


def run_torch(opts: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging import averagers
    from torch.distributed.algorithms.model_averaging import utils as avg_utils
    from torch.distributed.optim import PostLocalSGDOptimizer

    rank, world = mpi_rank()
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    model, opt, loader, test = setup(opts, rank, world)
    for t in model.state_dict().values():  # rank 0's model, as ours' constructor does
        dist.broadcast(t, 0)
    averager = averagers.PeriodicModelAverager(period=opts["period"], warmup_steps=0)
    spent = [0.0, 0]  # seconds in average_parameters, rounds
    averaged = timed(averager.average_parameters, spent)

    def average_parameters(params) -> None:  # time and count only the calls that average
        if averager.step % averager.period:
            averager.step += 1
        else:
            averaged(params)

    averager.average_parameters = average_parameters
    wrapped = PostLocalSGDOptimizer(optim=opt, averager=averager)
    dist.barrier()
    clock = Clock()
    steps = train(model, wrapped, epochs(loader, opts["steps"]))
    timed(avg_utils.average_parameters, spent)(iter(model.parameters()), None)  # consensus
    out = {"rank": rank, "steps": steps, **clock.stop(), "acc": accuracy(model, test),
           "rounds": spent[1], "comm_s": spent[0]}  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return out


def run_torchft(opts: dict) -> dict:
    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import LocalSGD

    rank, world = mpi_rank()  # each rank is a replica group of one process
    model, opt, loader, test = setup(opts, rank, world)
    limit = timedelta(seconds=opts["timeout"])
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=limit)  # the group's own store

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=limit), min_replica_size=2, init_sync=True,
        load_state_dict=load_state_dict,
        state_dict=lambda: {"model": model.state_dict(), "optim": opt.state_dict()},
        replica_id=f"api_loop_{rank}", store_addr="127.0.0.1", store_port=store.port,
        rank=0, world_size=1, lighthouse_addr=opts["lighthouse"], hostname="127.0.0.1",
        timeout=limit, quorum_timeout=limit, connect_timeout=limit,
    )  # fmt: skip
    spent = [0.0, 0]  # seconds in sync (quorum, allreduce, commit), rounds
    try:
        with LocalSGD(manager, model, opt, sync_every=opts["period"]) as local_sgd:
            local_sgd.sync()  # the first quorum: the process group is configured (not timed)
            local_sgd.sync = timed(local_sgd.sync, spent)
            clock = Clock()
            steps = train(model, opt, epochs(loader, opts["steps"]))
            timing = clock.stop()
        return {"rank": rank, "steps": steps, **timing, "acc": accuracy(model, test),
                "rounds": spent[1], "comm_s": spent[0],
                "commits": manager.current_step()}  # fmt: skip
    finally:
        manager.shutdown(wait=False)


def main(name: str, opts: dict) -> None:
    if name == "none":
        out = run_none(opts)
    elif name == "torch-postlocal":
        out = run_torch(opts)
    elif name == "torchft-localsgd":
        out = run_torchft(opts)
    else:  # ours-ALGO-ENGINE
        algo, engine = name.removeprefix("ours-").rsplit("-", 1)
        out = run_ours(opts, algo, engine)
    print(MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout
    main(sys.argv[1], json.loads(sys.argv[2]))
    if sys.argv[1] == "torchft-localsgd":  # its last collective is done: leave without its
        sys.stdout.flush()  # threads' teardown
        sys.stderr.flush()
        os._exit(0)
