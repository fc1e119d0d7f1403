"""``run(config, launch) -> summary``: the one place that wires the parts together.

config -> comm -> data -> model in a flat buffer -> synchroniser -> steps -> outputs.
Epochs are passes over this rank's shard; every rank runs the same number of steps, so the
ranks agree on every collective round by construction.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hpc_asgd import metrics
from hpc_asgd.comm import Comm, make_comm
from hpc_asgd.config import Config
from hpc_asgd.data import Dataset, ShardSampler, load_dataset
from hpc_asgd.env import Launch, is_tty
from hpc_asgd.flat import FlatModel
from hpc_asgd.models import build_model
from hpc_asgd.optim import FlatSGD, Schedule
from hpc_asgd.sync import make_synchronizer

EVAL_BATCH = 512


def _threads_per_rank(launch: Launch) -> int:
    """Cores this rank may use: its affinity mask if the launcher bound it, else a fair share."""
    mask = len(os.sched_getaffinity(0))
    bound = mask < (os.cpu_count() or mask)
    return max(1, mask if bound else mask // max(1, launch.local_size))


def evaluate(
    model: torch.nn.Module, data: Dataset, comm: Comm, device: torch.device, extra: torch.Tensor
) -> torch.Tensor:
    """Test loss and accuracy over the whole test set, each rank taking a disjoint shard with
    its own model; one allreduce sums ``[correct, loss_sum, count, *extra]``."""
    sampler = ShardSampler(
        len(data.test), comm.rank, comm.size, EVAL_BATCH, seed=0, shuffle=False, drop_last=False
    )
    acc = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for idx in sampler.epoch(0):
            x, y = data.test.batch(idx, train=False)
            out = model(x.to(device))
            y = y.to(device)
            acc[0] += (out.argmax(1) == y).sum().item()
            acc[1] += F.cross_entropy(out, y, reduction="sum").item()
            acc[2] += y.numel()
    model.train()
    stats = torch.cat([acc, extra.to(torch.float64)])
    comm.allreduce_(stats)
    return stats


def run(cfg: Config, launch: Launch, comm: Comm | None = None) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to ``--out`` by rank 0).

    ``cfg`` is validated here (again, cheaply) so that library callers get the same checks as
    the CLI; the CLI validates before it starts the engine, so that errors need no collective.
    """
    t_start = time.perf_counter()
    cfg.validate(launch.size, launch.local_size)
    torch.set_num_threads(_threads_per_rank(launch))
    comm = comm or make_comm(cfg.run.comm, launch, cfg.run.comm_timeout)
    d, o, s, r = cfg.data, cfg.optim, cfg.sync, cfg.run
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
    flat = FlatModel(model, device=device)
    sync = make_synchronizer(cfg, comm, flat)
    sync.start()

    sampler = ShardSampler(len(data.train), comm.rank, comm.size, d.batch_size, r.seed)
    spe = sampler.steps_per_epoch
    total = max(1, math.ceil(r.epochs * spe))
    every = max(1, round(r.eval_every * spe))
    opt = FlatSGD(o.momentum, o.weight_decay, o.nesterov)
    sched = Schedule(
        o.lr,
        r.epochs,
        o.lr_schedule,
        o.warmup_epochs,
        o.warmup_lr,
        tuple(o.lr_milestones),
        o.lr_gamma,
    )
    gen = torch.Generator().manual_seed(r.seed * 7919 + comm.rank)  # augmentation draws
    lead = comm.rank == 0
    out = Path(r.out) if r.out else None
    progress = metrics.Progress(total, spe, lead, is_tty(sys.stderr))
    rows: list[dict] = []
    fault = launch.fault if launch.fault and launch.fault.rank == comm.rank else None
    slow = r.slow_factor if r.slow_rank == comm.rank else 1.0

    train_s = 0.0  # first step to last, without evaluation
    loss_sum = torch.zeros((), dtype=torch.float64)
    loss_n = 0
    batches: list[torch.Tensor] = []
    model.train()
    t_seg = time.perf_counter()
    for step in range(total):
        epoch_i, i = divmod(step, spe)
        if i == 0:
            batches = list(sampler.epoch(epoch_i))
        if fault is not None and step == fault.step:
            _inject(fault.kind, comm.rank, step)
        t_step = time.perf_counter()
        x, y = data.train.batch(batches[i], train=True, gen=gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        flat.zero_grad()
        loss.backward()
        epoch = step / spe
        sync.grads_ready(step + 1)
        opt.step(flat.params, flat.grad, sched(epoch))
        sync.step_done(step + 1, (step + 1) / spe)
        loss_sum += loss.detach().to(torch.float64).cpu()
        loss_n += 1
        if slow > 1:  # straggler injection: stretch this step to F times its measured length
            time.sleep((slow - 1) * (time.perf_counter() - t_step))
        progress.step(step + 1, None)
        if (step + 1) % every == 0 or step + 1 == total:
            train_s += time.perf_counter() - t_seg
            if step + 1 == total:
                sync.finish()  # the final exact average comes before the final evaluation
            st = evaluate(
                model, data, comm, device, torch.stack([loss_sum, torch.tensor(float(loss_n))])
            )
            row = {
                "epoch": round((step + 1) / spe, 4),
                "time_s": round(time.perf_counter() - t_start, 3),
                "samples": (step + 1) * d.batch_size * comm.size,
                "train_loss": float(st[3] / max(st[4], 1)),
                "test_acc": float(st[0] / st[2]),
                "test_loss": float(st[1] / st[2]),
            }
            rows.append(row)
            progress.epoch(row)
            if lead and out:
                metrics.write_jsonl(out / "metrics.jsonl", rows)
            loss_sum.zero_()
            loss_n = 0
            t_seg = time.perf_counter()

    digest = bytes.fromhex(flat.checksum())
    sums = comm.allgather(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    waits = comm.allgather(torch.tensor([sync.wait_s, train_s], dtype=torch.float64))
    samples = total * d.batch_size * comm.size
    train_s_max = float(waits[:, 1].max())
    summary = {
        "algo": s.algo,
        "update": cfg.workers.update,
        "comm": comm.name,
        "world_size": comm.size,
        "workers_per_rank": cfg.workers.workers,
        "dataset": d.dataset,
        "model": cfg.model.model,
        "epochs": r.epochs,
        "steps_per_rank": total,
        "samples_processed": samples,
        "wall_s": round(time.perf_counter() - t_start, 3),
        "train_s": round(train_s_max, 3),
        "samples_per_s": round(samples / train_s_max, 1) if train_s_max > 0 else None,
        "final_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "averaging_rounds": sync.rounds,
        "comm_wait_s": [round(float(w), 4) for w in waits[:, 0]],
        "param_checksums": [bytes(row.tolist()).hex() for row in sums],
        "consensus": len({bytes(row.tolist()) for row in sums}) == 1,
        "versions": metrics.versions(comm.name),
        "config": cfg.to_dict(),
    }
    if lead and out:
        metrics.save_model(out / "model.pt", model, cfg.to_dict())
        metrics.write_json(out / "summary.json", summary)
    return summary


def _inject(kind: str, rank: int, step: int) -> None:
    """Fault injection for the failure tests (``HPC_ASGD_FAULT``, read by env.py)."""
    if kind == "stop":  # stop answering, as a hung node does; the peers' deadline must fire
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    raise RuntimeError(f"injected fault at step {step}")
