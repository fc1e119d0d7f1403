"""Time one model-averaging round (allreduce-sum of a flat float32 buffer, then / world size).

Contenders, per (ranks, buffer size), all measured in one invocation of this script:

  ours-mpi             ``comm.iallreduce_(flat).wait(); flat.div_(size)`` (hpc_asgd mpi engine)
  raw-mpi4py           ``COMM_WORLD.Iallreduce(IN_PLACE, arr, SUM).Wait(); arr /= size``
                       on a numpy view of the same buffer
  ours-gloo            the same round as ours-mpi through the hpc_asgd gloo engine
  ours-horovod         the same round through the hpc_asgd Horovod engine (allreduce_async_ +
                       poll; skipped with a note when Horovod is not installed)
  torch-averager       ``PeriodicModelAverager(period=1, warmup_steps=0).average_parameters``
                       on a real ResNet (gloo process group); it flattens by copying each round
  ours-mpi-blocking    ``comm.allreduce_(flat); flat.div_(size)``: the blocking round the
                       synchronisers use (MPI_Allreduce under the watchdog's deadline)
  raw-mpi4py-blocking  ``COMM_WORLD.Allreduce(IN_PLACE, arr, SUM); arr /= size``
  copy-floor           ``dst.copy_(src)`` of the same buffer in one process: the memory bound

The driver (``python benchmarks/allreduce.py``) measures the floor itself, then launches
``mpirun -n R --oversubscribe python benchmarks/allreduce.py --worker ...`` once per rank
count R. Each job brings up both engines (the gloo process group bootstraps over MPI) and
times every contender after a warm-up; a repeat is the mean seconds per round over ``iters``
rounds, after a barrier, and the contenders are interleaved repeat by repeat (order rotated)
so that slow phases of a shared machine hit them alike. Rank 0 gathers every rank's times
and prints one JSON line. A repeat counts the slowest rank; the figure is the median over
``--repeats`` repeats.

Outputs: ``<out>/allreduce.json`` (every raw number, medians, ratios, command, versions, host)
and ``<out>/allreduce.md`` (a table of medians in ms and the ratios).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from _common import mpi_env, mpirun_exe, run_tree, versions  # noqa: E402

# name -> (model, input shape, classes, parameters); the buffer is the model's parameter count.
SIZES = {
    "resnet20": ("resnet20", (3, 32, 32), 10, 269_722),
    "resnet50": ("resnet50", (3, 224, 224), 1000, 25_557_032),
}
DISTRIBUTED = (
    "ours-mpi",
    "raw-mpi4py",
    "ours-mpi-blocking",
    "raw-mpi4py-blocking",
    "ours-gloo",
    "ours-horovod",
    "torch-averager",
)
CONTENDERS = (*DISTRIBUTED, "copy-floor")
MARK = "ALLREDUCE_BENCH_JSON "  # prefix of the worker's result line on stdout
TARGET_S = 0.5  # seconds one timed measurement should take when --iters is automatic
MAX_ITERS = 2000


# ---- timing helpers (driver and workers) -------------------------------------------------
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


def choose_iters(per_call_s: float, fixed: int, target_s: float) -> int:
    if fixed > 0:
        return fixed
    return max(1, min(MAX_ITERS, round(target_s / max(per_call_s, 1e-9))))


# ---- worker: one rank of one mpirun job ---------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    import torch

    from hpc_asgd import env
    from hpc_asgd.comm import make_comm

    launch = env.detect()
    nproc = os.cpu_count() or 1
    torch.set_num_threads(max(1, nproc // max(1, launch.local_size)))
    wanted = [c for c in DISTRIBUTED if c in args.contenders]
    # Both engines live in this one job: gloo's process group bootstraps over MPI, and each
    # engine sits idle (no progress thread spinning) while the other one is being timed.
    comm_mpi = make_comm("mpi", launch, timeout=60.0)
    comm_gloo = (
        make_comm("gloo", launch, timeout=60.0)
        if {"ours-gloo", "torch-averager"} & set(wanted)
        else None
    )
    # Horovod (scripts/install_horovod.sh): its background thread runs only while it has work.
    comm_hvd = make_comm("horovod", launch, timeout=60.0) if "ours-horovod" in wanted else None
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    assert (comm_mpi.rank, comm_mpi.size) == (rank, size)

    out: dict = {"ranks": size, "torch_threads": torch.get_num_threads(), "results": {}}
    for size_name in args.sizes:
        model_name, shape, classes, n = SIZES[size_name]
        gen = torch.Generator().manual_seed(1234 + rank)
        flat = torch.randn(n, generator=gen, dtype=torch.float32)
        arr = flat.numpy()  # the same memory, seen by numpy

        def ours_mpi(flat=flat):
            comm_mpi.iallreduce_(flat).wait()
            flat.div_(size)

        def raw_mpi4py(arr=arr):
            world.Iallreduce(MPI.IN_PLACE, arr, op=MPI.SUM).Wait()
            arr /= size

        def ours_blocking(flat=flat):
            comm_mpi.allreduce_(flat)
            flat.div_(size)

        def raw_blocking(arr=arr):
            world.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            arr /= size

        def ours_horovod(flat=flat):
            comm_hvd.iallreduce_(flat).wait()
            flat.div_(size)

        def ours_gloo(flat=flat):
            comm_gloo.iallreduce_(flat).wait()
            flat.div_(size)

        steps = {
            "ours-mpi": ours_mpi,
            "raw-mpi4py": raw_mpi4py,
            "ours-mpi-blocking": ours_blocking,
            "raw-mpi4py-blocking": raw_blocking,
            "ours-gloo": ours_gloo,
            "ours-horovod": ours_horovod,
        }
        model = None
        if "torch-averager" in wanted:
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager,
            )

            from hpc_asgd.models import build_model

            torch.manual_seed(1234 + rank)
            model = build_model(model_name, shape, classes)
            n_model = sum(p.numel() for p in model.parameters())
            assert n_model == n, f"{model_name} has {n_model} parameters, expected {n}"
            for p in model.parameters():  # torch averages only parameters that have a grad,
                p.grad = torch.zeros_like(p)  # as they do after a training step's backward
            averager = PeriodicModelAverager(period=1, warmup_steps=0)

            def torch_averager(model=model, averager=averager):
                averager.average_parameters(model.parameters())

            steps["torch-averager"] = torch_averager
        steps = {c: steps[c] for c in wanted}

        # Correctness first: one round on rank-valued data must leave the mean everywhere.
        mean = (size + 1) / 2
        for name, step in steps.items():
            tensors = list(model.parameters()) if name == "torch-averager" else [flat]
            with torch.no_grad():
                for t in tensors:
                    t.fill_(rank + 1)
            step()
            tensors = list(model.parameters()) if name == "torch-averager" else [flat]
            bad = [t for t in tensors if not torch.allclose(t, torch.full_like(t, mean))]
            if bad:
                raise SystemExit(f"rank {rank}: {name} did not average (expected {mean})")
        flat.copy_(torch.randn(n, generator=gen))

        # Warm up every contender and agree on its iterations (the slowest rank's estimate).
        iters = {}
        for name, step in steps.items():
            world.Barrier()
            per_call = world.allreduce(warm_up(step), op=MPI.MAX)
            iters[name] = choose_iters(per_call, args.iters, args.target_s)
        # Interleave: every repeat times each contender once, in an order rotated per repeat,
        # so slow phases of a shared machine hit all contenders alike.
        reps: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for r in range(args.repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                world.Barrier()
                reps[name].append(timed(steps[name], iters[name]))
        world.Barrier()
        res = out["results"][size_name] = {}
        for name in names:
            res[name] = {"iters": iters[name], "per_rank_s": world.gather(reps[name], root=0)}
        del flat, arr, steps, model

    world.Barrier()
    if rank == 0:
        print(MARK + json.dumps(out), flush=True)
    if comm_gloo is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


# ---- driver --------------------------------------------------------------------------------
def copy_floor(n: int, repeats: int, fixed_iters: int, target_s: float, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    src = torch.randn(n, dtype=torch.float32)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    iters = choose_iters(warm_up(step), fixed_iters, target_s)
    reps = [timed(step, iters) for _ in range(repeats)]
    return {"iters": iters, "per_rank_s": [reps], "torch_threads": threads}


def launch_job(args: argparse.Namespace, ranks: int) -> tuple[dict, list[str]]:
    cmd = [
        mpirun_exe(args.mpirun),
        "-n",
        str(ranks),
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--sizes",
        *args.sizes,
        "--contenders",
        *args.contenders,
        "--repeats",
        str(args.repeats),
        "--iters",
        str(args.iters),
        "--target-s",
        str(args.target_s),
    ]
    t0 = time.monotonic()
    proc = run_tree(cmd, args.job_timeout, mpi_env())
    if proc is None:
        sys.exit(f"allreduce.py: {shlex.join(cmd)} ran past --job-timeout {args.job_timeout} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or len(lines) != 1:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"allreduce.py: {shlex.join(cmd)} failed (rc {proc.returncode})")
    print(f"  mpirun -n {ranks}: {time.monotonic() - t0:.1f} s", flush=True)
    return json.loads(lines[0][len(MARK) :]), cmd


def summarise(entry: dict) -> None:
    """Per repeat, the slowest rank's time; then the median (and range) over repeats."""
    per_rep = [max(col) for col in zip(*entry["per_rank_s"], strict=True)]
    entry["per_repeat_s"] = per_rep
    entry["median_s"] = statistics.median(per_rep)
    entry["min_s"], entry["max_s"] = min(per_rep), max(per_rep)


GOALS = (
    ("ours-mpi", "raw-mpi4py"),
    ("ours-mpi-blocking", "raw-mpi4py-blocking"),
    ("ours-gloo", "torch-averager"),
    ("ours-mpi", "torch-averager"),
    ("ours-horovod", "ours-mpi"),
    ("ours-horovod", "ours-gloo"),
)


def ratios(row: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``ratio_of_medians``; for contenders timed in the same job also ``paired``: the median
    over repeats of the per-repeat ratio (both timed back to back, so a noisy phase cancels)."""
    out = {}
    pairs = [*GOALS, ("ours-mpi-blocking", "torch-averager")]
    pairs += [(c, "copy-floor") for c in DISTRIBUTED]
    for num, den in pairs:
        if num in row and den in row:
            r = {"ratio_of_medians": row[num]["median_s"] / row[den]["median_s"]}
            if den != "copy-floor":
                per = [
                    a / b
                    for a, b in zip(row[num]["per_repeat_s"], row[den]["per_repeat_s"], strict=True)
                ]
                r["paired"] = statistics.median(per)
            out[f"{num} / {den}"] = r
    return out


def markdown(report: dict) -> str:
    v = report["versions"]
    shown = [c for c in CONTENDERS if any(c in row for row in report["results"].values())]
    lines = [
        "# Allreduce: time per model-averaging round",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Host `{report['hostname']}`, {report['nproc']} cores, {report['date']}; "
        f"torch {v['torch']}, mpi4py {v['mpi4py']}, {v['mpi_library'].split(',')[0]}, "
        f"Python {v['python']}; wall time {report['wall_s']} s.",
        "",
        "Median over repeats of the mean time per round, in ms (a repeat counts the slowest "
        "rank); [min-max] over repeats below each.",
        "",
        "| ranks | buffer | floats | " + " | ".join(shown) + " |",
        "|---:|---|---:|" + "---:|" * len(shown),
    ]
    for key, row in report["results"].items():
        ranks, size_name = key.split("x", 1)
        cells = [
            f"{row[c]['median_s'] * 1e3:.3g} [{row[c]['min_s'] * 1e3:.3g}-"
            f"{row[c]['max_s'] * 1e3:.3g}]"
            if c in row
            else "-"
            for c in shown
        ]
        head = f"| {ranks} | {size_name} | {SIZES[size_name][3]:,} | "
        lines.append(head + " | ".join(cells) + " |")
    names = [f"{a} / {b}" for a, b in GOALS]
    names += ["ours-mpi-blocking / torch-averager"]
    names += [f"{c} / copy-floor" for c in DISTRIBUTED if c in shown]
    lines += [
        "",
        "Ratios of the medians; in brackets the paired ratio (median over repeats of the "
        "ratio of two contenders timed back to back). Goals: ours-mpi / raw-mpi4py <= 1.10, "
        "ours-mpi-blocking / raw-mpi4py-blocking <= 1.10, "
        "ours-gloo / torch-averager < 1, ours-mpi / torch-averager < 1.",
        "",
        "| ranks | buffer | " + " | ".join(names) + " |",
        "|---:|---|" + "---:|" * len(names),
    ]
    for key, r in report["ratios"].items():
        ranks, size_name = key.split("x", 1)
        cells = []
        for k in names:
            if k not in r:
                cells.append("-")
            elif "paired" in r[k]:
                cells.append(f"{r[k]['ratio_of_medians']:.2f} ({r[k]['paired']:.2f})")
            else:
                cells.append(f"{r[k]['ratio_of_medians']:.2f}")
        lines.append(f"| {ranks} | {size_name} | " + " | ".join(cells) + " |")
    iters = {key: {c: e["iters"] for c, e in row.items()} for key, row in report["results"].items()}
    lines += [
        "",
        f"Repeats: {report['args']['repeats']}. Iterations per repeat (chosen so a repeat "
        f"takes about {report['args']['target_s']} s unless `--iters` is given): "
        + "; ".join(
            f"{k}: " + ", ".join(f"{c} {i}" for c, i in row.items()) for k, row in iters.items()
        )
        + ".",
        "",
        f"`copy-floor`: `dst.copy_(src)` of the buffer in one process with "
        f"{report['args']['floor_threads']} torch thread(s); every rank runs "
        f"{report['jobs'][0]['torch_threads'] if report['jobs'] else '?'} torch thread(s). "
        "`ours-mpi-blocking` is the round the synchronisers run (`comm.allreduce_`: "
        "`MPI_Allreduce` under the watchdog's deadline); `raw-mpi4py-blocking` is "
        "`MPI.Allreduce` on the same buffer.",
        "",
    ]
    return "\n".join(lines)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    command = shlex.join(["python", "benchmarks/allreduce.py", *argv])
    print(f"allreduce benchmark: {command}", flush=True)
    if "ours-horovod" in args.contenders and importlib.util.find_spec("horovod") is None:
        print("  ours-horovod skipped: Horovod is not installed (scripts/install_horovod.sh)")
        args.contenders = [c for c in args.contenders if c != "ours-horovod"]
    floor = {}
    if "copy-floor" in args.contenders:
        for size_name in args.sizes:
            n = SIZES[size_name][3]
            floor[size_name] = copy_floor(
                n, args.repeats, args.iters, args.target_s, args.floor_threads
            )
            summarise(floor[size_name])
        print("  copy floor measured", flush=True)

    results: dict[str, dict] = {}
    jobs = []
    distributed = [c for c in args.contenders if c in DISTRIBUTED]
    for ranks in args.ranks:
        out: dict = {"results": {}, "torch_threads": None}
        if distributed:
            out, cmd = launch_job(args, ranks)
            jobs.append(
                {"ranks": ranks, "command": shlex.join(cmd), "torch_threads": out["torch_threads"]}
            )
        for size_name in args.sizes:
            row = results[f"{ranks}x{size_name}"] = {}
            for name, entry in out["results"].get(size_name, {}).items():
                summarise(entry)
                row[name] = entry
            if size_name in floor:
                row["copy-floor"] = floor[size_name]

    report = {
        "benchmark": "allreduce",
        "command": command,
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "versions": versions(mpi=True),
        "sizes": {k: v[3] for k, v in SIZES.items() if k in args.sizes},
        "jobs": jobs,
        "results": results,
        "ratios": {key: ratios(row) for key, row in results.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    out_dir = ROOT / args.out  # an absolute --out stays as given
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "allreduce.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out_dir / "allreduce.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'allreduce.json'} and {out_dir / 'allreduce.md'}")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--iters",
        type=int,
        default=0,
        help="rounds per repeat; 0 (default) picks them so a repeat takes ~--target-s",
    )
    p.add_argument("--target-s", type=float, default=TARGET_S)
    p.add_argument("--out", default="benchmarks/results", help="relative to the repository")
    p.add_argument("--floor-threads", type=int, default=1, help="torch threads of copy-floor")
    p.add_argument("--mpirun", default=None, help="mpirun to use (default: the venv's, or PATH)")
    p.add_argument("--job-timeout", type=float, default=600.0)
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
