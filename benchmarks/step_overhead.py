"""Per-step overhead of a worker's step above a bare PyTorch step, in one process.

Our ``Stepper.step`` (the path a worker takes: batch gather and normalisation, the rule's read
and apply on the shared flat buffer, the finite check, the stats row) against two bare
PyTorch steps of the same model: ``bare``, forward/backward/SGD on a batch gathered and
normalised by the same dataset code; ``bare-fixed``, the same on batches gathered beforehand
(forward/backward/SGD only). The three run in interleaved chunks of ``--chunk`` steps, the
order rotated each round, so that the machine's drift falls on all of them; the figures are
medians over the rounds, and paired differences (ours minus bare, per round). One thread.
Prints one ``STEP_OVERHEAD_JSON {...}`` line; ``shm_scaling.py --epochs`` runs it per rule.

    python benchmarks/step_overhead.py --data-dir DIR --update hogwild
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

MARK = "STEP_OVERHEAD_JSON "


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="MNIST IDX files (the digits are fine)")
    p.add_argument("--update", default="hogwild")
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--chunk", type=int, default=300)
    a = p.parse_args(argv)

    import multiprocessing as mp

    import torch
    import torch.nn.functional as F

    from hpc_asgd.config import Config
    from hpc_asgd.data import load_dataset
    from hpc_asgd.env import detect
    from hpc_asgd.flat import FlatModel
    from hpc_asgd.models import build_model
    from hpc_asgd.rules import make_rule
    from hpc_asgd.stats import NSTATS
    from hpc_asgd.train import step_spec

    torch.set_num_threads(1)
    flags = {"dataset": "mnist", "data_dir": a.data_dir, "verify": False, "model": a.model,
             "batch_size": a.batch_size, "lr": a.lr, "momentum": a.momentum, "workers": 2,
             "update": a.update}  # fmt: skip
    cfg = Config.from_flat(flags)
    data = load_dataset("mnist", a.data_dir, verify=False, seed=0)
    torch.manual_seed(0)
    # ours: the worker's objects, over a shared buffer (W = 2: the workers' path, not W = 1's)
    flat = FlatModel(build_model(a.model, data.input_shape, data.num_classes), shared=True)
    rule = make_rule(cfg, flat.params, mp.get_context("spawn"))
    rule.attach(0)
    spec = step_spec(cfg, data, 0, 1, detect({}))
    sampler = spec.sampler()
    spe = sampler.steps_per_epoch
    stats = torch.zeros(NSTATS, dtype=torch.float64)
    ours = spec.stepper(flat, rule, stats, torch.device("cpu"))

    torch.manual_seed(0)
    model = build_model(a.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum)
    batches = sampler.epoch(0)
    fixed = [data.train.batch(batches[i], train=True) for i in range(16)]

    def bare(s: int) -> None:
        x, y = data.train.batch(batches[s % spe], train=True)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def bare_fixed(s: int) -> None:
        x, y = fixed[s % 16]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    runs = {"ours": ours.step, "bare": bare, "bare-fixed": bare_fixed}
    ms: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    s = 0
    for r in range(a.rounds + 1):
        for k in names[r % 3 :] + names[: r % 3]:
            t0 = time.perf_counter()
            for j in range(a.chunk):
                runs[k](s + j)
            if r:  # the first round warms up (allocator, caches)
                ms[k].append(1e3 * (time.perf_counter() - t0) / a.chunk)
        s += a.chunk
    out = {k: round(statistics.median(v), 4) for k, v in ms.items()}
    for k in ("bare", "bare-fixed"):
        diff = [x - y for x, y in zip(ms["ours"], ms[k], strict=True)]
        out[f"overhead_vs_{k}_ms"] = round(statistics.median(diff), 4)
    out.update(update=a.update, rounds=a.rounds, chunk=a.chunk)
    print(MARK + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
