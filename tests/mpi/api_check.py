"""The CLI's ``--algo local-sgd`` run, written as a user's own loop over the Python API:
``python tests/mpi/api_check.py OUT_JSON EPOCHS PERIOD MOMENTUM [MODEL]`` under mpirun.

Same data (the digits set, the same shards and order), same model and seed, same loss, plain
``torch.optim.SGD`` where the CLI has its flat SGD, ``hpc_asgd.LocalSGD`` hooked on it. Rank 0
writes every rank's checksum of the final flat buffer (parameters and buffers), as the CLI's
summary.json ``param_checksums`` does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import hpc_asgd
from hpc_asgd.data import ShardSampler, load_dataset
from hpc_asgd.models import build_model


def main(out: str, epochs: float, period: int, momentum: float, model_name: str = "mlp") -> None:
    comm = hpc_asgd.init("mpi")
    torch.set_num_threads(1)
    data = load_dataset("digits")
    torch.manual_seed(0)  # the CLI's --seed 0, before it builds the model
    model = build_model(model_name, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    sampler = ShardSampler(len(data.train), comm.rank, comm.size, 32, seed=0)
    total = math.ceil(epochs * sampler.steps_per_epoch)
    gen = torch.Generator().manual_seed(0 * 7919 + comm.rank)  # the CLI's augmentation stream
    with hpc_asgd.LocalSGD(model, opt, comm, period=period, steps=total) as avg:
        model.train()
        s = 0
        while not avg.should_stop():
            e, i = divmod(s, sampler.steps_per_epoch)
            x, y = data.train.batch(sampler.epoch(e)[i], train=True, gen=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            s += 1
    digest = bytes.fromhex(avg.flat.checksum())
    sums = comm.allgather(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    if comm.rank == 0:
        result = {
            "checksums": [bytes(r.tolist()).hex() for r in sums],
            "stats": avg.stats(),
        }
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], float(a[1]), int(a[2]), float(a[3]), *a[4:])
