"""Time one model-averaging round (allreduce-sum of a flat float32 buffer, then / world size).

Contenders per (ranks, buffer): ours-mpi, ours-mpi-blocking, ours-gloo, ours-horovod (hpc_asgd
engines), raw-mpi4py(-blocking), torch-averager (``peers/ddp.py``) and copy-floor (one process).
The driver times copy-floor, then runs ``mpirun -n R python benchmarks/allreduce.py --worker``
per rank count R: every contender is checked to average, warmed up, and timed ``--repeats``
times in rotated order. A repeat counts the slowest rank; figures are medians over repeats,
with paired ratios. Outputs ``<out>/allreduce.json`` and ``.md``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import _harness as h

# name -> (model, input shape, classes, parameters); the buffer is the model's parameter count.
SIZES = {
    "resnet20": ("resnet20", (3, 32, 32), 10, 269_722),
    "resnet50": ("resnet50", (3, 224, 224), 1000, 25_557_032),
}
DISTRIBUTED = ("ours-mpi", "raw-mpi4py", "ours-mpi-blocking", "raw-mpi4py-blocking",
               "ours-gloo", "ours-horovod", "torch-averager")  # fmt: skip
CONTENDERS = (*DISTRIBUTED, "copy-floor")
MARK = "ALLREDUCE_BENCH_JSON "  # prefix of the worker's result line on stdout
MAX_ITERS = 2000
GOALS = (("ours-mpi", "raw-mpi4py"), ("ours-mpi-blocking", "raw-mpi4py-blocking"),
         ("ours-gloo", "torch-averager"), ("ours-mpi", "torch-averager"),
         ("ours-horovod", "ours-mpi"), ("ours-horovod", "ours-gloo"))  # fmt: skip
PAIRS = (*GOALS, ("ours-mpi-blocking", "torch-averager"), *((c, "copy-floor") for c in DISTRIBUTED))


# ---- timing (driver and workers) -----------------------------------------------------------
def timed(step, iters: int) -> float:
    """Mean seconds per call of ``step`` over ``iters`` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def warm_up(step, max_s: float = 0.2, max_calls: int = 5) -> float:
    """One untimed call, then up to ``max_calls`` timed ones (stopping after ``max_s``);
    returns the mean seconds per timed call, used to choose ``iters``."""
    step()
    n, t0 = 0, time.perf_counter()
    while n < max_calls:
        step()
        n += 1
        if time.perf_counter() - t0 > max_s:
            break
    return (time.perf_counter() - t0) / n


def choose_iters(per_call_s: float, args) -> int:
    if args.iters > 0:
        return args.iters
    return max(1, min(MAX_ITERS, round(args.target_s / max(per_call_s, 1e-9))))


# ---- worker: one rank of one mpirun job ---------------------------------------------------
def measure(args, size_name: str, comms: dict, world, mpi) -> dict:
    """Check, warm up and time every wanted contender on one buffer size, on every rank."""
    import numpy as np
    import torch

    rank, size = world.Get_rank(), world.Get_size()
    model_name, shape, classes, n = SIZES[size_name]
    gen = torch.Generator().manual_seed(1234 + rank)
    flat = torch.randn(n, generator=gen, dtype=torch.float32)
    arr = flat.numpy()  # the same memory, seen by numpy

    def ours(engine: str, blocking: bool = False):
        comm = comms[engine]

        def step():
            comm.allreduce_(flat) if blocking else comm.iallreduce_(flat).wait()
            flat.div_(size)

        return step

    def raw(call):  # Allreduce returns nothing, Iallreduce a request
        def step():
            req = call(mpi.IN_PLACE, arr, op=mpi.SUM)
            if req is not None:
                req.Wait()
            np.divide(arr, size, out=arr)

        return step

    steps = {  # made on demand: only the wanted engines are up
        "ours-mpi": lambda: ours("mpi"),
        "raw-mpi4py": lambda: raw(world.Iallreduce),
        "ours-mpi-blocking": lambda: ours("mpi", blocking=True),
        "raw-mpi4py-blocking": lambda: raw(world.Allreduce),
        "ours-gloo": lambda: ours("gloo"),
        "ours-horovod": lambda: ours("horovod"),
    }
    steps = {c: steps[c]() for c in args.contenders if c in steps}
    tensors = {c: [flat] for c in steps}
    if "torch-averager" in args.contenders:
        from peers.ddp import averager_round

        steps["torch-averager"], tensors["torch-averager"] = averager_round(
            model_name, shape, classes, n, 1234 + rank
        )
    # Correctness first: one round on rank-valued data must leave the mean everywhere.
    mean = (size + 1) / 2
    for name, step in steps.items():
        with torch.no_grad():
            for t in tensors[name]:
                t.fill_(rank + 1)
        step()
        if not all(torch.allclose(t, torch.full_like(t, mean)) for t in tensors[name]):
            raise SystemExit(f"rank {rank}: {name} did not average (expected {mean})")
    flat.copy_(torch.randn(n, generator=gen))
    iters = {}  # per contender: the slowest rank's warm-up estimate, agreed by all
    for name, step in steps.items():
        world.Barrier()
        iters[name] = choose_iters(world.allreduce(warm_up(step), op=mpi.MAX), args)
    reps: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in h.rotated(list(steps), r):
            world.Barrier()
            reps[name].append(timed(steps[name], iters[name]))
    world.Barrier()
    return {c: {"iters": iters[c], "per_rank_s": world.gather(reps[c], root=0)} for c in steps}


def worker(args: argparse.Namespace) -> int:
    import torch

    from hpc_asgd import env
    from hpc_asgd.comm import make_comm

    launch = env.detect()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, launch.local_size)))
    # Every engine lives in this one job: gloo's process group bootstraps over MPI, and each
    # engine sits idle (no progress thread spinning) while another one is being timed;
    # Horovod's background thread runs only while it has work.
    wanted = set(args.contenders)
    comms = {"mpi": make_comm("mpi", launch, timeout=60.0)}
    if {"ours-gloo", "torch-averager"} & wanted:
        comms["gloo"] = make_comm("gloo", launch, timeout=60.0)
    if "ours-horovod" in wanted:
        comms["horovod"] = make_comm("horovod", launch, timeout=60.0)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    assert (comms["mpi"].rank, comms["mpi"].size) == (world.Get_rank(), world.Get_size())
    out: dict = {"ranks": world.Get_size(), "torch_threads": torch.get_num_threads()}
    out["results"] = {s: measure(args, s, comms, world, MPI) for s in args.sizes}
    world.Barrier()
    if world.Get_rank() == 0:
        print(MARK + json.dumps(out), flush=True)
    if "gloo" in comms:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


# ---- driver --------------------------------------------------------------------------------
def copy_floor(n: int, args) -> dict:
    import torch

    torch.set_num_threads(args.floor_threads)
    src = torch.randn(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    iters = choose_iters(warm_up(lambda: dst.copy_(src)), args)
    reps = [timed(lambda: dst.copy_(src), iters) for _ in range(args.repeats)]
    return {"iters": iters, "per_rank_s": [reps], "torch_threads": args.floor_threads}


def launch_job(args: argparse.Namespace, ranks: int) -> tuple[dict, list[str]]:
    cmd = [h.mpirun_exe(args.mpirun), "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--worker", "--sizes", *args.sizes]
    cmd += ["--contenders", *args.contenders, "--repeats", str(args.repeats)]
    cmd += ["--iters", str(args.iters), "--target-s", str(args.target_s)]
    t0 = time.monotonic()
    out = h.result_line(h.run_child(cmd, args.job_timeout, h.mpi_env()), MARK)
    if out is None:
        sys.exit(f"allreduce.py: {shlex.join(cmd)} printed no result")
    print(f"  mpirun -n {ranks}: {time.monotonic() - t0:.1f} s", flush=True)
    return out, cmd


def summarise(entry: dict) -> dict:
    """Per repeat, the slowest rank's time; then the median (and range) over repeats."""
    per_rep = [max(col) for col in zip(*entry["per_rank_s"], strict=True)]
    entry.update(per_repeat_s=per_rep, median_s=statistics.median(per_rep))
    entry.update(min_s=min(per_rep), max_s=max(per_rep))
    return entry


def ratios(row: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``ratio_of_medians``; for contenders timed in the same job also ``paired``: the median
    over repeats of the per-repeat ratio (both timed back to back, so a noisy phase cancels)."""
    out = {}
    for num, den in PAIRS:
        if num in row and den in row:
            r = {"ratio_of_medians": row[num]["median_s"] / row[den]["median_s"]}
            out[f"{num} / {den}"] = r
            if den != "copy-floor":
                r["paired"] = h.paired(row[num]["per_repeat_s"], row[den]["per_repeat_s"])
    return out


def markdown(report: dict) -> str:
    shown = [c for c in CONTENDERS if any(c in row for row in report["results"].values())]

    def ms(e: dict) -> str:
        return f"{e['median_s'] * 1e3:.3g} [{e['min_s'] * 1e3:.3g}-{e['max_s'] * 1e3:.3g}]"

    rows = []
    for key, row in report["results"].items():
        ranks, size = key.split("x", 1)
        rows.append(
            [ranks, size, f"{SIZES[size][3]:,}", *(ms(row[c]) if c in row else "-" for c in shown)]
        )
    names = [f"{a} / {b}" for a, b in PAIRS if b != "copy-floor" or a in shown]

    def cell(r: dict) -> str:
        return f"{r['ratio_of_medians']:.2f}" + (f" ({r['paired']:.2f})" if "paired" in r else "")

    ratio_rows = [
        [*key.split("x", 1), *(cell(r[k]) if k in r else "-" for k in names)]
        for key, r in report["ratios"].items()
    ]
    a, jobs = report["args"], report["jobs"]
    iters = "; ".join(
        f"{key}: " + ", ".join(f"{c} {e['iters']}" for c, e in row.items())
        for key, row in report["results"].items()
    )
    lines = [
        *h.header(report, "Allreduce: time per model-averaging round"),
        "Median over repeats of the mean time per round, in ms (a repeat counts the slowest "
        "rank); [min-max] over repeats below each.",
        "",
        *h.table(["ranks", "buffer", "floats", *shown], rows, "rlr"),
        "",
        "Ratios of the medians; in brackets the paired ratio (median over repeats of the "
        "ratio of two contenders timed back to back). Goals: ours-mpi / raw-mpi4py <= 1.10, "
        "ours-mpi-blocking / raw-mpi4py-blocking <= 1.10, "
        "ours-gloo / torch-averager < 1, ours-mpi / torch-averager < 1.",
        "",
        *h.table(["ranks", "buffer", *names], ratio_rows, "rlr"),
        "",
        f"Repeats: {a['repeats']}. Iterations per repeat (chosen so a repeat takes about "
        f"{a['target_s']} s unless `--iters` is given): {iters}.",
        "",
        f"`copy-floor`: `dst.copy_(src)` of the buffer in one process with "
        f"{a['floor_threads']} torch thread(s); every rank runs "
        f"{jobs[0]['torch_threads'] if jobs else '?'} torch thread(s). "
        "`ours-mpi-blocking` is the round the synchronisers run (`comm.allreduce_`: "
        "`MPI_Allreduce` under the watchdog's deadline); `raw-mpi4py-blocking` is "
        "`MPI.Allreduce` on the same buffer.",
        "",
    ]
    return "\n".join(lines)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = h.new_report("allreduce", argv, args)
    if "ours-horovod" in args.contenders and importlib.util.find_spec("horovod") is None:
        print("  ours-horovod skipped: Horovod is not installed (scripts/install_horovod.sh)")
        args.contenders = [c for c in args.contenders if c != "ours-horovod"]
    floor = {}
    if "copy-floor" in args.contenders:
        floor = {s: summarise(copy_floor(SIZES[s][3], args)) for s in args.sizes}
        print("  copy floor measured", flush=True)
    results: dict[str, dict] = {}
    jobs = []
    for ranks in args.ranks:
        out: dict = {"results": {}}
        if any(c in DISTRIBUTED for c in args.contenders):
            out, cmd = launch_job(args, ranks)
            jobs.append({"ranks": ranks, "command": shlex.join(cmd)})
            jobs[-1]["torch_threads"] = out["torch_threads"]
        for size_name in args.sizes:
            row = out["results"].get(size_name, {})
            row = {name: summarise(entry) for name, entry in row.items()}
            if size_name in floor:
                row["copy-floor"] = floor[size_name]
            results[f"{ranks}x{size_name}"] = row
    report["sizes"] = {k: v[3] for k, v in SIZES.items() if k in args.sizes}
    report["jobs"] = jobs
    report["results"] = results
    report["ratios"] = {key: ratios(row) for key, row in results.items()}
    h.write_report(report, markdown, "allreduce", mpi=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    h.options(
        p,
        ("--repeats", 5),
        ("--iters", 0, "rounds per repeat; 0 (default) picks them so a repeat takes ~--target-s"),
        ("--target-s", 0.5),
        h.OUT,
        ("--floor-threads", 1, "torch threads of copy-floor"),
        h.MPIRUN,
        ("--job-timeout", 600.0),
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.iters < 0 or min(args.ranks) < 2:
        p.error("--repeats >= 1, --iters >= 0 and --ranks >= 2 each")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    return worker(args) if args.worker else driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
