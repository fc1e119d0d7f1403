"""torchft's DiLoCo as a peer: one rank of a training job, each rank a replica group of one.

``outer.py`` runs ``mpirun -n R python benchmarks/peers/diloco.py torchft-diloco JSON`` with a
torchft lighthouse of its own (``opts["lighthouse"]``). The model, data, shard order, inner
SGD and evaluation schedule are ``peers/ddp.py``'s (hpc_asgd's); around the inner optimizer
``torchft.local_sgd.DiLoCo(manager, [model], inner, outer, sync_every=K)`` with the outer
optimizer ``SGD(lr, momentum, nesterov)`` on the pseudo-gradient, as DiLoCo's paper. Rounds
block (torchft's DiLoCo needs ``use_async_quorum=False``); communication time: the inner
steps that end in a round (quorum, allreduce of the pseudo-gradients, outer step, commit).
torchft has no final average: the model evaluated last is each replica's own after the
steps since its last round (none when K divides the steps). A default Gloo group
(MASTER_ADDR / PORT) carries only the evaluations' sums and the final figures, outside the
timed training. Rank 0 prints the result line ``peers/ddp.py`` prints.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path


def train_rank(opts: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    from hpc_asgd.data import ShardSampler, load_dataset
    from hpc_asgd.models import build_model
    from peers.ddp import eval_row, eval_steps

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
    torch.set_num_threads(opts["threads"] or max(1, len(os.sched_getaffinity(0)) // local))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    t_start = time.perf_counter()  # as hpc_asgd.train.run's clock: the engine is up

    data = load_dataset(opts["dataset"], opts["data_dir"])
    torch.manual_seed(opts["seed"])
    model = build_model(opts["model"], data.input_shape, data.num_classes)
    inner = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=opts["momentum"])
    outer = torch.optim.SGD(
        model.parameters(), lr=opts["outer_lr"], momentum=opts["outer_momentum"],
        nesterov=opts["outer_nesterov"],
    )  # fmt: skip
    limit = timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=limit)  # the replica's own store

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=limit), min_replica_size=world, init_sync=True,
        load_state_dict=load_state_dict, use_async_quorum=False,
        state_dict=lambda: {"model": model.state_dict(), "optim": inner.state_dict()},
        replica_id=f"diloco_{rank}", store_addr="127.0.0.1", store_port=store.port,
        rank=0, world_size=1, lighthouse_addr=opts["lighthouse"], hostname="127.0.0.1",
        timeout=limit, quorum_timeout=limit, connect_timeout=limit,
    )  # fmt: skip

    batch = opts["batch_size"]
    sampler = ShardSampler(len(data.train), rank, world, batch, opts["seed"])
    spe = sampler.steps_per_epoch
    total = max(1, math.ceil(opts["epochs"] * spe))
    pending = eval_steps(total, spe, opts["eval_every"])
    gen = torch.Generator().manual_seed(opts["seed"] * 7919 + rank)
    test = ShardSampler(len(data.test), rank, world, 512, 0, shuffle=False, drop_last=False)
    rows: list[dict] = []
    comm = [0.0, 0]  # seconds in DiLoCo's sync, rounds
    loss_sum, seen = 0.0, [0.0, 0]

    def evaluate(step: int) -> None:  # as peers/ddp.py: this rank's model on its test shard
        rows.append(eval_row(model, data, test, step, loss_sum, seen, t_start, spe, batch, world))

    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=opts["period"], pin_memory=False):
            model.train()
            dist.barrier()
            t_train0 = t_seg = time.perf_counter()
            train_s, batches = 0.0, []
            for s in range(total):
                e, i = divmod(s, spe)
                if i == 0:
                    batches = sampler.epoch(e)
                x, y = data.train.batch(batches[i], train=True, gen=gen)
                inner.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                t_step = time.perf_counter()
                inner.step()  # DiLoCo's hook: quorum, allreduce, outer step after every K-th
                if (s + 1) % opts["period"] == 0:  # a round's time: this whole step's
                    comm[0] += time.perf_counter() - t_step
                    comm[1] += 1
                loss_sum += loss.detach().item()
                if s + 1 == pending[0]:
                    train_s += time.perf_counter() - t_seg
                    evaluate(pending.pop(0))
                    t_seg = time.perf_counter()
    finally:
        manager.shutdown(wait=False)
    report(rank, world, total, batch, [train_s, comm[0], t_train0 - t_start], rows, comm[1])


def report(rank, world, total, batch, mine, rows, rounds) -> None:
    import torch
    import torch.distributed as dist

    from peers.ddp import MARK

    every = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(every, torch.tensor(mine, dtype=torch.float64))
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if rank == 0:
        per_rank = [t.tolist() for t in every]
        train = [r[0] for r in per_rank]
        samples = total * batch * world
        out = {
            "steps_per_rank": total, "samples_processed": samples,
            "samples_per_s": samples / max(train), "train_s_per_rank": train,
            "comm_wait_s": [r[1] for r in per_rank], "comm_inflight_s": [r[1] for r in per_rank],
            "averaging_rounds": rounds, "setup_s": per_rank[0][2], "final_test_acc":
            rows[-1]["test_acc"], "rows": rows, "hosts": hosts,
            "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
        print(MARK + json.dumps(out), flush=True)
    sys.stdout.flush()  # the all_gather was the last collective: leave without torchft's
    sys.stderr.flush()  # threads' teardown (as peers/ddp.py)
    os._exit(0)


if __name__ == "__main__":
    here = Path(__file__).resolve()
    sys.path[:0] = [str(here.parents[2]), str(here.parents[1])]  # this checkout, benchmarks/
    train_rank(json.loads(sys.argv[2]))
