"""Time one model-averaging round (allreduce-sum of a flat float32 buffer, then / world size).

Contenders, per (ranks, buffer size), all measured in one invocation of this script:

  ours-mpi        ``comm.iallreduce_(flat).wait(); flat.div_(size)``  (hpc_asgd mpi engine)
  raw-mpi4py      ``COMM_WORLD.Iallreduce(IN_PLACE, arr, SUM).Wait(); arr /= size`` (numpy view)
  ours-gloo       the same round as ours-mpi through the hpc_asgd gloo engine
  torch-averager  ``PeriodicModelAverager(period=1, warmup_steps=0).average_parameters(...)``
                  on a real ResNet (gloo process group); it flattens by copying every round
  copy-floor      ``dst.copy_(src)`` of the same buffer in one process: the memory-bandwidth bound

The driver (``python benchmarks/allreduce.py``) measures the floor itself, then launches
``mpirun -n R --oversubscribe python benchmarks/allreduce.py --worker --engine E`` once per
(ranks, engine); the mpi job runs ours-mpi and raw-mpi4py, the gloo job ours-gloo and
torch-averager. Every worker rank times each repeat (mean seconds per round over ``iters``
rounds, after warm-up and a barrier); rank 0 gathers them and prints one JSON line. A repeat's
time is the slowest rank's; the reported figure is the median over ``--repeats`` repeats.

Outputs: ``<out>/allreduce.json`` (every raw number, medians, ratios, command, versions, host)
and ``<out>/allreduce.md`` (a table of medians in ms and the ratios).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# name -> (model, input shape, classes, parameters); the buffer is the model's parameter count.
SIZES = {
    "resnet20": ("resnet20", (3, 32, 32), 10, 269_722),
    "resnet50": ("resnet50", (3, 224, 224), 1000, 25_557_032),
}
ENGINES = {"mpi": ("ours-mpi", "raw-mpi4py"), "gloo": ("ours-gloo", "torch-averager")}
CONTENDERS = ("ours-mpi", "raw-mpi4py", "ours-gloo", "torch-averager", "copy-floor")
MARK = "ALLREDUCE_BENCH_JSON "  # prefix of the worker's result line on stdout
TARGET_S = 0.3  # seconds one timed measurement should take when --iters is automatic
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
        steps = {}

        def ours_mpi(flat=flat):
            comm_mpi.iallreduce_(flat).wait()
            flat.div_(size)

        def raw_mpi4py(arr=arr):
            world.Iallreduce(MPI.IN_PLACE, arr, op=MPI.SUM).Wait()
            arr /= size

        def raw_blocking(arr=arr):
            world.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            arr /= size

        def ours_gloo(flat=flat):
            comm_gloo.iallreduce_(flat).wait()
            flat.div_(size)

        steps = {"ours-mpi": ours_mpi, "raw-mpi4py": raw_mpi4py,
                 "raw-mpi4py-blocking": raw_blocking, "ours-gloo": ours_gloo}  # fmt: skip
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
def copy_floor(n: int, repeats: int, fixed_iters: int, target_s: float) -> dict:
    import torch

    src = torch.randn(n, dtype=torch.float32)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    iters = choose_iters(warm_up(step), fixed_iters, target_s)
    reps = [timed(step, iters) for _ in range(repeats)]
    return {"iters": iters, "per_rank_s": [reps], "torch_threads": torch.get_num_threads()}


def mpirun_exe(given: str | None) -> str:
    for cand in (given, Path(sys.executable).parent / "mpirun", shutil.which("mpirun")):
        if cand and Path(cand).exists():
            return str(cand)
    sys.exit("allreduce.py: mpirun not found (pass --mpirun PATH)")


def mpi_env() -> dict[str, str]:
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):  # rendezvous over MPI
        env.pop(k, None)
    return env


def launch_job(args: argparse.Namespace, ranks: int, engine: str) -> tuple[dict, list[str]]:
    cmd = [mpirun_exe(args.mpirun), "-n", str(ranks), "--oversubscribe", "--bind-to", "none",
           sys.executable, str(Path(__file__).resolve()), "--worker", "--engine", engine,
           "--sizes", *args.sizes, "--repeats", str(args.repeats), "--iters", str(args.iters),
           "--target-s", str(args.target_s)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), cwd=ROOT,
                          timeout=args.job_timeout, check=False)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or len(lines) != 1:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"allreduce.py: {shlex.join(cmd)} failed (rc {proc.returncode})")
    print(f"  mpirun -n {ranks} --engine {engine}: {time.monotonic() - t0:.1f} s", flush=True)
    return json.loads(lines[0][len(MARK) :]), cmd


def summarise(entry: dict) -> None:
    """Per repeat, the slowest rank's time; then the median (and spread) over repeats."""
    per_rep = [max(col) for col in zip(*entry["per_rank_s"], strict=True)]
    entry["per_repeat_s"] = per_rep
    entry["median_s"] = statistics.median(per_rep)
    entry["min_s"], entry["max_s"] = min(per_rep), max(per_rep)


def ratios(row: dict[str, dict]) -> dict[str, float]:
    med = {k: v["median_s"] for k, v in row.items()}
    out = {}
    for num, den in (("ours-mpi", "raw-mpi4py"), ("ours-gloo", "torch-averager"),
                     ("ours-mpi", "torch-averager")):  # fmt: skip
        if num in med and den in med:
            out[f"{num} / {den}"] = med[num] / med[den]
    if "copy-floor" in med:
        for k in CONTENDERS[:-1]:
            if k in med:
                out[f"{k} / copy-floor"] = med[k] / med["copy-floor"]
    return out


def versions() -> dict[str, str]:
    import mpi4py
    import numpy
    import torch

    code = "from hpc_asgd.comm.mpi import library_version as v; print(v())"
    try:
        mpi_lib = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=mpi_env(), cwd=ROOT, timeout=60, check=True).stdout.strip()  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        mpi_lib = f"unknown ({e})"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "mpi4py": mpi4py.__version__, "numpy": numpy.__version__, "mpi_library": mpi_lib,
            "platform": platform.platform()}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        "# Allreduce: time per model-averaging round",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Host `{report['hostname']}`, {report['nproc']} cores, {report['date']}; "
        f"torch {report['versions']['torch']}, mpi4py {report['versions']['mpi4py']}, "
        f"{report['versions']['mpi_library']}, Python {report['versions']['python']}.",
        "",
        "Median over repeats of the mean time per round (ms; a repeat counts the slowest rank). "
        "`copy-floor` is one process copying the buffer (`dst.copy_(src)`).",
        "",
        "| ranks | buffer | floats | ours-mpi | raw-mpi4py | ours-gloo | torch-averager "
        "| copy-floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = report["results"]
    for key, row in rows.items():
        ranks, size_name = key.split("x", 1)
        cells = [
            f"{row[c]['median_s'] * 1e3:.3f}" if c in row else "-" for c in CONTENDERS
        ]
        lines.append(f"| {ranks} | {size_name} | {SIZES[size_name][3]:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios of medians (goals: ours-mpi / raw-mpi4py <= 1.10; ours-* / torch-averager < 1):",
        "",
        "| ranks | buffer | ours-mpi / raw-mpi4py | ours-gloo / torch-averager "
        "| ours-mpi / torch-averager | ours-mpi / floor | raw-mpi4py / floor "
        "| ours-gloo / floor | torch-averager / floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = ["ours-mpi / raw-mpi4py", "ours-gloo / torch-averager", "ours-mpi / torch-averager",
             "ours-mpi / copy-floor", "raw-mpi4py / copy-floor", "ours-gloo / copy-floor",
             "torch-averager / copy-floor"]  # fmt: skip
    for key, r in report["ratios"].items():
        ranks, size_name = key.split("x", 1)
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in names]
        lines.append(f"| {ranks} | {size_name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Repeats: {report['args']['repeats']}; iterations per repeat (auto targets "
        f"{report['args']['target_s']} s unless `--iters`) are in `allreduce.json`.",
        "",
    ]
    return "\n".join(lines)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *argv])
    print(f"allreduce benchmark: {command}", flush=True)
    floor = {}
    for size_name in args.sizes:
        floor[size_name] = copy_floor(SIZES[size_name][3], args.repeats, args.iters, args.target_s)
        summarise(floor[size_name])
    print("  copy floor measured", flush=True)

    results: dict[str, dict] = {}
    jobs = []
    for ranks in args.ranks:
        for engine in args.engines:
            out, cmd = launch_job(args, ranks, engine)
            jobs.append({"ranks": ranks, "engine": engine, "command": shlex.join(cmd),
                         "torch_threads": out["torch_threads"]})  # fmt: skip
            for size_name, entries in out["results"].items():
                row = results.setdefault(f"{ranks}x{size_name}", {})
                for name, entry in entries.items():
                    summarise(entry)
                    row[name] = entry
        for size_name in args.sizes:
            results[f"{ranks}x{size_name}"]["copy-floor"] = floor[size_name]

    report = {
        "benchmark": "allreduce",
        "command": command,
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "versions": versions(),
        "sizes": {k: v[3] for k, v in SIZES.items() if k in args.sizes},
        "jobs": jobs,
        "results": results,
        "ratios": {key: ratios(row) for key, row in results.items()},
        "wall_s": None,
    }
    report["wall_s"] = round(time.monotonic() - started, 1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "allreduce.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out_dir / "allreduce.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'allreduce.json'} and {out_dir / 'allreduce.md'} "
          f"({report['wall_s']} s)")  # fmt: skip
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=0,
                   help="rounds per repeat; 0 (default) picks them so a repeat takes ~--target-s")  # fmt: skip
    p.add_argument("--target-s", type=float, default=TARGET_S)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--mpirun", default=None, help="mpirun to use (default: the venv's, or PATH)")
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)
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
