"""Your own model, optimizer and training loop with hpc_asgd.

A 1-D convolutional classifier with BatchNorm (a model hpc_asgd's zoo does not have) learns to
tell noisy waveforms apart by their frequency, on data this script generates, with AdamW, in a
plain PyTorch loop. hpc_asgd adds two things to it: a shard of the data per rank, and one
synchroniser object whose hook on the optimizer's step averages the ranks' models (parameters
and BatchNorm statistics) as the chosen algorithm says.

    python examples/own_loop.py                                     # alone: world size 1
    mpirun -n 2 python examples/own_loop.py --algo lasgd --period 8
    mpirun -n 4 python examples/own_loop.py --algo hier-avg --group-size 2
    torchrun --nproc-per-node 2 examples/own_loop.py --algo local-sgd --engine gloo
    srun --mpi=pmix python examples/own_loop.py --algo local-async

Rank 0 prints the test accuracy and the averaging figures, and with ``--out FILE`` writes them
as JSON, with every rank's parameter checksum and the shard it trained on in the first epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hpc_asgd

LENGTH = 64  # samples per waveform


def waveforms(n: int, classes: int, seed: int) -> TensorDataset:
    """``n`` noisy sines, x (n, 1, LENGTH) float32, y (n,) int64: class c makes 2c + 2 cycles
    per window, at a random phase and amplitude, under Gaussian noise half their size."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    t = torch.arange(LENGTH, dtype=torch.float32) / LENGTH  # (LENGTH,)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    amplitude = 0.5 + torch.rand(n, 1, generator=g)
    x = amplitude * torch.sin(2 * math.pi * (2 * y[:, None] + 2) * t + phase)  # (n, LENGTH)
    x += 0.5 * torch.randn(n, LENGTH, generator=g)
    return TensorDataset(x.unsqueeze(1), y)


class WaveNet(nn.Module):
    """Conv1d -> BatchNorm -> ReLU, twice, then global average pooling and a linear head."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 7, padding=3),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, LENGTH)
        return self.head(self.features(x).mean(-1))  # (B, classes)


def synchroniser(args: argparse.Namespace, model: nn.Module, opt, comm: hpc_asgd.Comm):
    """The algorithm ``--algo`` names, over the model and the optimizer (one class each)."""
    common = {"steps": args.steps}  # each rank's share of the job's budget
    if args.algo == "sync":
        return hpc_asgd.SyncSGD(model, opt, comm, **common)
    if args.algo == "none":
        return hpc_asgd.NoSync(model, opt, comm, **common)
    if args.algo == "hier-avg":
        return hpc_asgd.HierAvg(
            model, opt, comm, group_size=args.group_size, local_period=args.period,
            global_period=2, nonblocking=args.nonblocking, **common,
        )  # fmt: skip
    cls = {"local-sgd": hpc_asgd.LocalSGD, "local-async": hpc_asgd.LocalAsync,
           "lasgd": hpc_asgd.LASGD}[args.algo]  # fmt: skip
    return cls(model, opt, comm, period=args.period, **common)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="lasgd",
                   choices=["sync", "local-sgd", "local-async", "lasgd", "hier-avg", "none"],
                   help="the synchroniser (default: lasgd)")  # fmt: skip
    p.add_argument("--engine", default="auto", help="auto | mpi | gloo | horovod | local")
    p.add_argument("--period", type=int, default=8, help="K: local steps between rounds")
    p.add_argument("--group-size", type=int, default=0,
                   help="hier-avg: ranks per group (0: the ranks of one node)")  # fmt: skip
    p.add_argument("--nonblocking", action="store_true", help="hier-avg: non-blocking rounds")
    p.add_argument("--steps", type=int, default=300, help="node steps per rank (the budget)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's learning rate")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--samples", type=int, default=8192, help="training waveforms (all ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="rank 0 writes the results here, as JSON")
    args = p.parse_args()

    comm = hpc_asgd.init(args.engine)  # the ranks from mpirun / srun / torchrun, or alone
    torch.set_num_threads(1)  # (ranks share a small machine in the tests)
    train = waveforms(args.samples, args.classes, seed=args.seed)
    test = waveforms(2048, args.classes, seed=args.seed + 1)
    torch.manual_seed(args.seed)  # (rank 0's initial model is every rank's)
    model = WaveNet(args.classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    # your own schedule too: linear decay to a tenth over this rank's share of the budget
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.1, 1 - s / args.steps))
    # a disjoint shard of the training set per rank, reshuffled each epoch
    sampler = hpc_asgd.ShardSampler.of(train, comm, batch_size=args.batch_size, seed=args.seed)
    loader = DataLoader(train, batch_sampler=sampler)

    t0 = time.perf_counter()
    model.train()
    with synchroniser(args, model, opt, comm) as avg:
        for x, y in avg.iterate(loader):  # epochs until this rank's budget is spent
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()  # the synchroniser's hook runs after it
            decay.step()
    # leaving the block: the rounds drained, the final exact average (every rank the same bits)
    seconds = time.perf_counter() - t0

    stats = avg.stats()
    acc = accuracy(model, test)
    params = torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()
                        if t.is_floating_point()])  # fmt: skip
    digest = hashlib.sha256(params.numpy().tobytes()).digest()
    sums = comm.allgather(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    shards = comm.allgather(sampler.indices(0))  # (ranks, per shard): the first epoch's
    steps = comm.allgather(torch.tensor([stats["steps"]]))
    if comm.rank == 0:
        result = {
            "algo": args.algo,
            "engine": comm.name,
            "world_size": comm.size,
            "test_acc": acc,
            "seconds": round(seconds, 3),
            "steps": steps[:, 0].tolist(),
            "checksums": [bytes(row.tolist()).hex() for row in sums],
            "shards": shards.tolist(),
            "stats": stats,
        }
        overlap = stats["comm_overlap"]
        print(
            f"{args.algo} on {comm.size} rank(s) ({comm.name}): test accuracy {acc:.4f}, "
            f"{stats['rounds']} rounds, overlap "
            f"{'-' if overlap is None else f'{overlap:.2f}'}, {seconds:.1f} s, "
            f"consensus {len(set(result['checksums'])) == 1}"
        )
        if args.out:
            args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
