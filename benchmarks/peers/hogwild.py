"""The pytorch/examples ``mnist_hogwild`` peer of ``shm_scaling.py``: ``model.share_memory()``,
W spawned processes, each with its own ``torch.optim.SGD`` over the shared parameters and its
share of the batches (step s to process s mod W), timed from a start barrier to the end of the
last process. With ``"profile": true`` process 0 prints a cProfile of its timed loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

MARK = "SHM_SCALING_JSON "


def _proc(rank, model, x, y, batches, threads, lr, momentum, barrier, times, profile):
    import ctypes

    import torch
    import torch.nn.functional as F

    with contextlib.suppress(OSError, AttributeError):  # die with the parent
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(threads)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    prof = None
    if profile and rank == 0:
        import cProfile

        prof = cProfile.Profile()
    barrier.wait()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    if prof:
        prof.enable()
    for idx in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    if prof:
        prof.disable()
    times[rank, 0], times[rank, 1] = t0, time.perf_counter()
    if prof:
        import pstats

        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(o: dict) -> None:
    import torch
    import torch.multiprocessing as mp

    from hpc_asgd.data import ShardSampler, load_dataset
    from hpc_asgd.models import build_model

    data = load_dataset(o["dataset"], o["data_dir"], verify=o["verify"], seed=0,
                        synthetic_size=o["synthetic_size"])  # fmt: skip
    n = len(data.train)
    x, y = data.train.batch(torch.arange(n), train=False)  # normalised once, as a tensor
    x, y = x.contiguous().share_memory_(), y.contiguous().share_memory_()
    sampler = ShardSampler(n, 0, 1, o["batch_size"], 0)
    spe = sampler.steps_per_epoch
    order = [b for e in range(math.ceil(o["steps"] / spe)) for b in sampler.epoch(e)]
    order = order[: o["steps"]]
    torch.manual_seed(0)
    model = build_model(o["model"], data.input_shape, data.num_classes)
    model.share_memory()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    w, threads = o["workers"], o["threads"]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(w)
    times = torch.zeros((w, 2), dtype=torch.float64).share_memory_()
    procs = []
    for rank in range(w):
        batches = torch.stack(order[rank::w])  # (steps_r, B): this process's share
        args = (rank, model, x, y, batches, threads, o["lr"], o["momentum"], barrier, times)
        procs.append(ctx.Process(target=_proc, args=(*args, o["profile"])))
        procs[-1].start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"peer: a worker failed ({[p.exitcode for p in procs]})")
    train_s = float(times[:, 1].max() - times[:, 0].min())
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model.eval()
    with torch.no_grad():
        xt, yt = data.test.batch(torch.arange(len(data.test)), train=False)
        acc = float((model(xt).argmax(1) == yt).float().mean())
    out = {
        "samples_per_s": round(o["steps"] * o["batch_size"] / train_s, 1),
        "train_s": round(train_s, 4),
        "steps": o["steps"],
        "threads": threads,
        "final_test_acc": acc,
        "params_moved": bool((after != before).any()),  # the workers trained the shared model
    }
    print(MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hpc_asgd
    main(json.loads(sys.argv[1]))
