"""Samples/s of W shared-memory workers (one rank) against a PyTorch ``mnist_hogwild`` peer.

Contenders, per (model, W), all measured in one invocation of this script:

  hogwild, leashed,      ``python -m hpc_asgd.cli train --update RULE --workers W ...``: the
  locked, partitioned    rank's own process at W = 1, W spawned workers otherwise; the figure is
                         ``summary.json["samples_per_s"]`` (training time only: from the moment
                         every worker is ready to the last step)
  peer                   written here in the style of pytorch/examples ``mnist_hogwild``:
                         ``model.share_memory()``, W ``torch.multiprocessing`` processes (spawn),
                         each with its own ``torch.optim.SGD`` over the shared parameters, each
                         looping over its share of the batches (node step s goes to process
                         s mod W). Timed from a start barrier (all W processes built and ready)
                         to the end of the last process

Every contender trains the same model (``hpc_asgd.models.build_model``, seed 0) on the same
data in the same batch order (``ShardSampler``, seed 0), the same number of steps of batch
``--batch-size``, with SGD ``--lr`` / ``--momentum`` (momentum private to each process), and
the same torch threads per process: ``--threads`` (default 1, so that W measures the scaling of
W processes, as the issue's peer figure of 1.92x at W = 2 implies; with ``--threads 0`` each
process gets ``cores // W``, so the one process of W = 1 already uses every core through intra-
op parallelism: here the CNN runs 1.8x faster on 2 threads than on 1). Models mlp and cnn run
on MNIST-format 1x28x28 data (real MNIST from ``--data-dir``, else scikit-learn's digits
upscaled to 28x28 and written as IDX files into a temporary folder: the CLI's synthetic dataset
is always 3x32x32); resnet20 runs on the 3x32x32 synthetic dataset. A repeat runs every
contender once per (model, W), in an order rotated each repeat; every run is a fresh process
tree. The figure is the median over ``--repeats``; ratios are ratios of medians, and ``ours /
peer`` also has a paired ratio (the median over repeats of the per-repeat ratio).

Outputs: ``<out>/shm_scaling.json`` (every raw number, medians, ratios, goals, command,
versions, host) and ``<out>/shm_scaling.md`` (tables).

``--profile RULE`` instead runs one case (``--models``/``--workers``, first of each) of our
trainer with cProfile inside every spawned worker (a ``sitecustomize`` written to a temporary
folder on ``PYTHONPATH``, active only in this script's own child processes) and prints the top
functions of worker 0, next to a cProfile of the peer's worker 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    Foreign,
    cores,
    die_with_parent,
    load_average,
    run_tree,
    versions,
    wait_idle,
)

RULES = ("hogwild", "leashed", "locked", "partitioned")
CONTENDERS = (*RULES, "peer")
DEFAULT_CONTENDERS = ("hogwild", "leashed", "peer")
# model -> (dataset, steps per run): about 2 s of training at W = 1 on a 2-core machine.
MODELS = {"mlp": ("mnist", 3000), "cnn": ("mnist", 200), "resnet20": ("synthetic", 64)}
MARK = "SHM_SCALING_JSON "  # prefix of the peer's result line on stdout
GOALS_SPEEDUP = {"cnn": 1.9, "mlp": 1.75}  # W=2 vs W=1, stated by the issue
PEER_REFERENCE = {"cnn": 1.92, "mlp": 1.57}  # the issue author's peer-style W=2 speedups


def threads_for(workers: int) -> int:
    """Torch threads per process: the cores shared out, as ``hpc_asgd.train`` does."""
    return max(1, cores() // workers)


# ---- data ----------------------------------------------------------------------------------
def write_idx(path: Path, arr) -> None:
    import numpy as np

    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.tobytes())


def write_mnist_like(folder: Path, copies: int = 4, seed: int = 0) -> dict:
    """scikit-learn's digits as MNIST IDX files (uint8, 1x28x28): each 8x8 digit is upscaled
    (bilinear) to 20x20 and placed in a 28x28 canvas, centred for the first copy and the test
    set, shifted by up to 2 pixels for the other ``copies - 1`` copies of the training set
    (1,437 x copies training images, 360 test images: digits' own split)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.images, bunch.target, test_size=360, stratify=bunch.target, random_state=0
    )
    rng = np.random.default_rng(seed)

    def place(x: np.ndarray, shifts: bool) -> np.ndarray:
        t = torch.from_numpy(x).float().unsqueeze(1) / 16.0
        up = F.interpolate(t, size=(20, 20), mode="bilinear", align_corners=False)
        up = (up.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
        out = np.zeros((len(x), 28, 28), np.uint8)
        dy = rng.integers(2, 7, len(x)) if shifts else np.full(len(x), 4)
        dx = rng.integers(2, 7, len(x)) if shifts else np.full(len(x), 4)
        for i in range(len(x)):
            out[i, dy[i] : dy[i] + 20, dx[i] : dx[i] + 20] = up[i]
        return out

    train = np.concatenate([place(x_tr, c > 0) for c in range(copies)])
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", train)
    write_idx(folder / "train-labels-idx1-ubyte", np.tile(y_tr, copies))
    write_idx(folder / "t10k-images-idx3-ubyte", place(x_te, False))
    write_idx(folder / "t10k-labels-idx1-ubyte", y_te)
    return {"train": len(train), "test": len(x_te), "source": "sklearn digits upscaled to 28x28"}


def load(dataset: str, data_dir: str | None, synthetic_size: int):
    from hpc_asgd.data import load_dataset

    return load_dataset(dataset, data_dir, synthetic_size=synthetic_size, seed=0)


# ---- the peer: pytorch/examples mnist_hogwild style ----------------------------------------
def _peer_proc(rank, model, x, y, batches, threads, lr, momentum, barrier, times, profile):
    import torch
    import torch.nn.functional as F

    die_with_parent()  # never outlive the peer run (the driver kills that on a timeout)
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


def peer(args: argparse.Namespace) -> int:
    """One peer run (a subprocess of the driver): prints one JSON line."""
    import torch
    import torch.multiprocessing as mp

    from hpc_asgd.data import ShardSampler
    from hpc_asgd.models import build_model

    dataset, _ = MODELS[args.model]
    data = load(dataset, args.data_dir, args.synthetic_size)
    n = len(data.train)
    x, y = data.train.batch(torch.arange(n), train=False)  # normalised once, as a tensor
    x, y = x.contiguous().share_memory_(), y.contiguous().share_memory_()
    sampler = ShardSampler(n, 0, 1, args.batch_size, 0)
    spe = sampler.steps_per_epoch
    order = [b for e in range(math.ceil(args.steps / spe)) for b in sampler.epoch(e)]
    order = order[: args.steps]
    torch.manual_seed(0)
    model = build_model(args.model, data.input_shape, data.num_classes)
    model.share_memory()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    w = args.workers
    threads = args.threads or threads_for(w)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(w)
    times = torch.zeros((w, 2), dtype=torch.float64).share_memory_()
    procs = []
    for rank in range(w):
        batches = torch.stack(order[rank::w])  # (steps_r, B): this process's share
        p = ctx.Process(
            target=_peer_proc,
            args=(
                rank,
                model,
                x,
                y,
                batches,
                threads,
                args.lr,
                args.momentum,
                barrier,
                times,
                args.peer_profile,
            ),
        )
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"peer: a worker failed ({[p.exitcode for p in procs]})")
    train_s = float(times[:, 1].max() - times[:, 0].min())
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.set_num_threads(cores())
    model.eval()
    with torch.no_grad():
        xt, yt = data.test.batch(torch.arange(len(data.test)), train=False)
        acc = float((model(xt).argmax(1) == yt).float().mean())
    out = {
        "samples_per_s": round(args.steps * args.batch_size / train_s, 1),
        "train_s": round(train_s, 4),
        "steps": args.steps,
        "threads": threads,
        "final_test_acc": acc,
        "params_moved": bool((after != before).any()),  # the workers trained the shared model
    }
    print(MARK + json.dumps(out), flush=True)
    return 0


# ---- driver ----------------------------------------------------------------------------------
def case_args(args: argparse.Namespace, model: str, data_dir: str | None) -> dict:
    """The dataset flags and the step count of one model, as both contenders get them."""
    dataset, steps = MODELS[model]
    steps = max(1, round(steps * args.steps_scale))
    size = args.synthetic_size or max(steps * args.batch_size, 512)
    return {
        "dataset": dataset,
        "data_dir": data_dir if dataset == "mnist" else None,
        "steps": steps,
        "synthetic_size": size,
    }


def ours_cmd(args, model: str, workers: int, rule: str, case: dict, out: Path) -> list[str]:
    # epochs such that ceil(epochs * steps_per_epoch) == steps; evaluate only at the end
    n = case["n_train"]
    spe = n // args.batch_size
    epochs = case["steps"] / spe
    assert max(1, math.ceil(epochs * spe)) == case["steps"]
    cmd = [
        sys.executable,
        "-m",
        "hpc_asgd.cli",
        "train",
        "--dataset",
        case["dataset"],
        "--model",
        model,
        "--workers",
        str(workers),
        "--update",
        rule,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        repr(epochs),
        "--eval-every",
        repr(max(epochs, 1.0)),
        "--lr",
        str(args.lr),
        "--momentum",
        str(args.momentum),
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    if case["data_dir"]:
        cmd += ["--data-dir", case["data_dir"]]
    if case["dataset"] == "synthetic":
        cmd += ["--synthetic-size", str(case["synthetic_size"])]
    if args.threads:
        cmd += ["--threads-per-worker", str(args.threads)]
    return cmd


def peer_cmd(args, model: str, workers: int, case: dict) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--peer",
        "--models",
        model,
        "--workers",
        str(workers),
        "--steps",
        str(case["steps"]),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--momentum",
        str(args.momentum),
        "--synthetic-size",
        str(case["synthetic_size"]),
    ]
    if case["data_dir"]:
        cmd += ["--data-dir", case["data_dir"]]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def run_child(cmd: list[str], timeout: float, env: dict | None = None) -> str:
    proc = run_tree(cmd, timeout, env)  # a process group: killed whole on a timeout
    if proc is None:
        sys.exit(f"{Path(sys.argv[0]).name}: {shlex.join(cmd)} ran past {timeout} s")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"{Path(sys.argv[0]).name}: {shlex.join(cmd)} failed (rc {proc.returncode})")
    return proc.stdout


# ---- other jobs on a shared machine ------------------------------------------------------------
def guarded(run, args, label: str) -> dict:
    """``run()`` -> result dict, measured while other jobs on the machine stay below
    ``--max-foreign`` cores on average (CPU time of the whole machine minus this process
    tree's own, over the run's wall time); otherwise retried, up to ``--retries`` times,
    keeping the least disturbed attempt. Adds ``foreign_cores``, ``attempts`` (made) and
    ``kept_attempt``."""
    best = None
    for attempt in range(1, args.retries + 2):
        wait_idle(args.idle_wait, args.max_foreign)
        probe = Foreign()
        res = run()
        foreign = probe.cores()
        res["foreign_cores"] = round(foreign, 3) if math.isfinite(foreign) else None
        res["kept_attempt"] = attempt
        if best is None or foreign < best["foreign_cores"]:
            best = res
        best["attempts"] = attempt
        if not foreign > args.max_foreign:
            break
        print(f"    {label}: other jobs used {foreign:.2f} cores during the run; "
              + ("retrying" if attempt <= args.retries else "keeping the least disturbed run"),
              flush=True)  # fmt: skip
    return best


def run_one(args, model: str, workers: int, contender: str, case: dict, tmp: Path) -> dict:
    def once() -> dict:
        t0 = time.monotonic()
        if contender == "peer":
            stdout = run_child(peer_cmd(args, model, workers, case), args.run_timeout)
            lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
            res = json.loads(lines[-1][len(MARK) :])
        else:
            out = tmp / f"{model}-{workers}-{contender}"
            run_child(ours_cmd(args, model, workers, contender, case, out), args.run_timeout)
            s = json.loads((out / "summary.json").read_text())
            if s["steps_per_rank"] != case["steps"]:
                sys.exit(
                    f"shm_scaling.py: ours ran {s['steps_per_rank']} steps, not {case['steps']}"
                )
            res = {
                "samples_per_s": s["samples_per_s"],
                "train_s": max(s["train_s"]),  # per rank; one rank here
                "steps": s["steps_per_rank"],
                "final_test_acc": s["final_test_acc"],
                "worker_steps": s["workers"]["steps"][0],
            }
        res["run_s"] = round(time.monotonic() - t0, 2)
        return res

    return guarded(once, args, f"{model} W={workers} {contender}")


def summarise(reps: list[dict]) -> dict:
    v = [r["samples_per_s"] for r in reps]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": reps}


def analyse(results: dict, contenders: list[str], workers: list[int]) -> dict:
    """Speedups W=k / W=1 per contender, ours / peer per W, and the issue's goals."""
    speedup: dict = {}
    vs_peer: dict = {}
    for model, by_w in results.items():
        speedup[model] = {}
        for c in contenders:
            base = by_w.get("1", {}).get(c)
            speedup[model][c] = {
                w: by_w[w][c]["median"] / base["median"]
                for w in by_w
                if base and c in by_w[w] and w != "1"
            }
        vs_peer[model] = {}
        for w, row in by_w.items():
            if "peer" not in row:
                continue
            vs_peer[model][w] = {}
            for c in contenders:
                if c == "peer" or c not in row:
                    continue
                per = [
                    a["samples_per_s"] / b["samples_per_s"]
                    for a, b in zip(row[c]["repeats"], row["peer"]["repeats"], strict=True)
                ]
                vs_peer[model][w][c] = {
                    "ratio_of_medians": row[c]["median"] / row["peer"]["median"],
                    "paired": statistics.median(per),
                }
    goals = []
    for model, target in GOALS_SPEEDUP.items():
        for c in contenders:
            got = speedup.get(model, {}).get(c, {}).get("2")
            if got is not None:
                goals.append(
                    {
                        "goal": f"{model} W=2 >= {target}x W=1",
                        "contender": c,
                        "value": round(got, 3),
                        "met": got >= target,
                    }
                )
    for model, by_w in vs_peer.items():
        for w, row in by_w.items():
            for c, r in row.items():
                goals.append(
                    {
                        "goal": f"{model} W={w} ours >= peer",
                        "contender": c,
                        "value": round(r["ratio_of_medians"], 3),
                        "met": r["ratio_of_medians"] >= 1.0,
                    }
                )
    return {"speedup": speedup, "ours_over_peer": vs_peer, "goals": goals}


def disturbance(raw: dict) -> dict:
    """How much other jobs used the machine during the kept runs (``guarded``)."""
    runs = []
    stack = [raw]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, dict) and "foreign_cores" in item:
                    runs.append(item)
                else:
                    stack.append(item)
    foreign = [r["foreign_cores"] for r in runs if r["foreign_cores"] is not None]
    return {
        "runs": len(runs),
        "retried": sum(r["attempts"] > 1 for r in runs),
        "median_foreign_cores": statistics.median(foreign) if foreign else None,
        "max_foreign_cores": max(foreign) if foreign else None,
    }


def disturbance_line(report: dict) -> str:
    d, a = report["disturbance"], report["args"]
    if d["median_foreign_cores"] is None:
        return "Other jobs' CPU use could not be read (/proc/stat)."
    return (
        f"Other jobs on the machine during the kept runs: median {d['median_foreign_cores']:.2f}, "
        f"max {d['max_foreign_cores']:.2f} cores; {d['retried']} of {d['runs']} runs were "
        f"retried because they exceeded {a['max_foreign']} cores (up to {a['retries']} "
        "retries, the least disturbed attempt kept)."
    )


def markdown(report: dict) -> str:
    v = report["versions"]
    a = report["analysis"]
    cs = report["args"]["contenders"]
    lines = [
        "# Shared-memory workers: samples/s vs W, ours vs an mnist_hogwild-style peer",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Host `{report['hostname']}`, {report['nproc']} cores, {report['date']}; "
        f"torch {v['torch']}, Python {v['python']}; load average before "
        f"{report['load_before']}, after {report['load_after']}; wall time "
        f"{report['wall_s']} s. Batch {report['args']['batch_size']}, lr "
        f"{report['args']['lr']}, momentum {report['args']['momentum']}; torch threads per "
        f"process: {report['threads']}. Data: {report['data']}.",
        "",
        disturbance_line(report),
        "",
        "Samples/s (training only), median over "
        f"{report['args']['repeats']} repeats, [min-max] below each.",
        "",
        "| model | steps | W | " + " | ".join(cs) + " |",
        "|---|---:|---:|" + "---:|" * len(cs),
    ]
    for model, by_w in report["results"].items():
        for w, row in by_w.items():
            cells = [
                f"{row[c]['median']:.0f} [{row[c]['min']:.0f}-{row[c]['max']:.0f}]"
                if c in row
                else "-"
                for c in cs
            ]
            lines.append(
                f"| {model} | {report['steps'][model]} | {w} | " + " | ".join(cells) + " |"
            )
    lines += ["", "Speedup over W=1 of the same contender (ratio of medians).", ""]
    lines += ["| model | W | " + " | ".join(cs) + " |", "|---|---:|" + "---:|" * len(cs)]
    for model, by_c in a["speedup"].items():
        ws = sorted({w for d in by_c.values() for w in d}, key=int)
        for w in ws:
            cells = [f"{by_c[c][w]:.2f}" if w in by_c.get(c, {}) else "-" for c in cs]
            lines.append(f"| {model} | {w} | " + " | ".join(cells) + " |")
    ours = [c for c in cs if c != "peer"]
    if "peer" in cs and ours:
        lines += [
            "",
            "Ours / peer samples/s at the same W (ratio of medians; paired in brackets).",
            "",
            "| model | W | " + " | ".join(ours) + " |",
            "|---|---:|" + "---:|" * len(ours),
        ]
        for model, by_w in a["ours_over_peer"].items():
            for w, row in by_w.items():
                cells = [
                    f"{row[c]['ratio_of_medians']:.2f} ({row[c]['paired']:.2f})"
                    if c in row
                    else "-"
                    for c in ours
                ]
                lines.append(f"| {model} | {w} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (from the issue):", "", "| goal | contender | value | met |"]
    lines += ["|---|---|---:|---|"]
    for g in a["goals"]:
        lines.append(
            f"| {g['goal']} | {g['contender']} | {g['value']:.2f} | {'yes' if g['met'] else 'NO'} |"
        )
    lines += [
        "",
        "The issue author's own peer-style measurement at batch 16: "
        + ", ".join(f"{m} W=2 {s}x" for m, s in PEER_REFERENCE.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    command = shlex.join(["python", "benchmarks/shm_scaling.py", *argv])
    print(f"shm_scaling benchmark: {command}", flush=True)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="shm_scaling-") as tmp_name:
        tmp = Path(tmp_name)
        if args.data_dir:
            data_dir, data_note = args.data_dir, f"MNIST from {args.data_dir}"
        else:
            data_dir = str(tmp / "mnist-like")
            info = write_mnist_like(Path(data_dir))
            data_note = (
                f"mlp/cnn: {info['source']} ({info['train']} train, {info['test']} "
                "test images, IDX files)"
            )
        if "resnet20" in args.models:
            data_note += "; resnet20: the 3x32x32 synthetic dataset"
        cases = {}
        for model in args.models:
            case = case_args(args, model, data_dir)
            case["n_train"] = len(
                load(case["dataset"], case["data_dir"], case["synthetic_size"]).train
            )
            cases[model] = case
        raw: dict = {
            m: {str(w): {c: [] for c in args.contenders} for w in args.workers} for m in args.models
        }
        for r in range(args.repeats):
            for model in args.models:
                for w in args.workers:
                    k = (r + w) % len(args.contenders)
                    for c in args.contenders[k:] + args.contenders[:k]:
                        res = run_one(args, model, w, c, cases[model], tmp)
                        raw[model][str(w)][c].append(res)
                        print(
                            f"  repeat {r + 1}/{args.repeats} {model} W={w} {c}: "
                            f"{res['samples_per_s']:.0f} samples/s (run {res['run_s']} s)",
                            flush=True,
                        )
    results = {
        m: {w: {c: summarise(v) for c, v in row.items()} for w, row in by_w.items()}
        for m, by_w in raw.items()
    }
    report = {
        "benchmark": "shm_scaling",
        "command": command,
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cores_usable": cores(),
        "load_before": load_before,
        "load_after": load_average(),
        "versions": versions(),
        "data": data_note,
        "threads": {str(w): args.threads or threads_for(w) for w in args.workers},
        "steps": {m: c["steps"] for m, c in cases.items()},
        "results": results,
        "analysis": analyse(results, list(args.contenders), list(args.workers)),
        "disturbance": disturbance(raw),
        "wall_s": round(time.monotonic() - started, 1),
    }
    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shm_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out_dir / "shm_scaling.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'shm_scaling.json'} and {out_dir / 'shm_scaling.md'}")
    return 0


# ---- profiling ------------------------------------------------------------------------------
SITECUSTOMIZE = """
import os
if os.environ.get("SHM_SCALING_PROFILE_DIR"):
    import atexit, cProfile, multiprocessing.process as _mp_process
    _orig = _mp_process.BaseProcess.run
    def _run(self):
        prof = cProfile.Profile()
        prof.enable()
        try:
            return _orig(self)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(os.environ["SHM_SCALING_PROFILE_DIR"],
                                         f"{self.name}-{os.getpid()}.prof"))
    _mp_process.BaseProcess.run = _run
"""


def profile(args: argparse.Namespace) -> int:
    """cProfile our worker 0 (inside hpc_asgd's own spawned workers, through a sitecustomize
    on this script's children's PYTHONPATH) and the peer's worker 0; print the top entries."""
    import pstats

    model, w, rule = args.models[0], args.workers[0], args.profile
    with tempfile.TemporaryDirectory(prefix="shm_scaling-prof-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = args.data_dir or str(tmp / "mnist-like")
        if not args.data_dir:
            write_mnist_like(Path(data_dir))
        case = case_args(args, model, data_dir)
        case["n_train"] = len(load(case["dataset"], case["data_dir"], case["synthetic_size"]).train)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp / "prof").mkdir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(tmp / "site"), env.get("PYTHONPATH")])
        )
        env["SHM_SCALING_PROFILE_DIR"] = str(tmp / "prof")
        out = tmp / "ours"
        run_child(ours_cmd(args, model, w, rule, case, out), args.run_timeout, env)
        s = json.loads((out / "summary.json").read_text())
        print(
            f"ours ({rule}, {model}, W={w}): {s['samples_per_s']} samples/s over "
            f"{max(s['train_s'])} s; cProfile of worker 0 (includes start-up):"
        )
        profs = sorted((tmp / "prof").glob("hpc-asgd-w0-*.prof"))
        if profs:
            pstats.Stats(str(profs[0])).sort_stats("tottime").print_stats(args.profile_top)
        else:
            print("  (no worker profile: W = 1 runs in the rank's own process)")
        stdout = run_child([*peer_cmd(args, model, w, case), "--peer-profile"], args.run_timeout)
        print(f"peer ({model}, W={w}), cProfile of worker 0 (timed loop only):")
        print(stdout)
    return 0


def add_guard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="retry a run during which other jobs used more cores than this on average",
    )
    p.add_argument("--retries", type=int, default=2, help="retries of a disturbed run")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=20.0,
        help="seconds to wait before each run for other jobs to fall below --max-foreign",
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(DEFAULT_CONTENDERS),
        help="'all' is not a choice: list them (hogwild leashed locked partitioned peer)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.5)
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every model's step count (mlp 3000, cnn 200, resnet20 64)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1); 0 = cores // W, at least 1",
    )
    p.add_argument("--data-dir", default=None, help="real MNIST IDX files (default: digits)")
    p.add_argument("--synthetic-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results", help="relative to the repository")
    p.add_argument("--run-timeout", type=float, default=300.0)
    add_guard_args(p)
    p.add_argument(
        "--profile",
        choices=RULES,
        default=None,
        help="profile one case of ours (first --models, first --workers) and the peer",
    )
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--peer-profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.workers) < 1 or args.batch_size < 1:
        p.error("--repeats, --workers and --batch-size must be positive")
    if args.peer:
        args.model = args.models[0]
        args.workers = args.workers[0]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.peer:
        return peer(args)
    if args.profile:
        return profile(args)
    return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
