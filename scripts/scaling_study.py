#!/usr/bin/env python3
"""Scaling study on SLURM: submit a sweep of one sbatch template, wait, and tabulate the results.

The sweep is the product nodes x ranks-per-node x algorithm x update rule x workers per rank.
Each point is one run of the template (see slurm/common.sh for the knobs) with its own output
folder ``<out-root>/<point>``; after the jobs end, every ``summary.json`` is gathered into
``<out-root>/study.csv`` and ``<out-root>/study.md`` (with speed-up and efficiency against the
smallest configuration of the same algorithm and update rule).

    # print what would be submitted
    python scripts/scaling_study.py --template slurm/cifar10_hier_avg.sh --nodes 1 2 4 \\
        --algos local-sgd hier-avg --epochs 1 --data-dir $DATA --dry-run
    # submit as one job array per resource shape, wait, gather
    python scripts/scaling_study.py --template slurm/mnist_leashed.sh --nodes 1 \\
        --cpus-per-task 8 --workers 1 2 4 8 --mode array --wait
    # gather again later (or after some jobs were requeued)
    python scripts/scaling_study.py --out-root runs/study --gather-only

Modes: ``jobs`` (independent jobs, run as resources allow), ``chain`` (each job depends on the
previous one with afterany, so points never share nodes: fair timings on a shared cluster),
``array`` (one job array per (nodes, ranks per node) shape; each task runs one point, chosen by
a generated wrapper that exports the point's knobs and runs the template). Variables reach the
jobs through sbatch's environment (sbatch exports the submitting environment), so values with
spaces or commas are safe.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
COLUMNS = [
    "point",
    "algo",
    "update",
    "nodes",
    "ranks_per_node",
    "world_size",
    "workers",
    "samples_per_s",
    "speedup",
    "efficiency",
    "final_test_acc",
    "final_test_loss",
    "wall_s",
    "averaging_rounds",
    "epochs",
    "dataset",
    "model",
    "job",
    "state",
    "out_dir",
]


@dataclass
class Point:
    """One configuration of the sweep and where its job and results are."""

    name: str
    nodes: int
    ranks_per_node: int
    algo: str
    update: str | None
    workers: int | None
    out_dir: str
    job: str = ""  # job id, or <array id>_<task> for array tasks
    env: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--template",
        type=Path,
        default=ROOT / "slurm" / "cifar10_hier_avg.sh",
        help="sbatch template from slurm/ that each point runs",
    )
    p.add_argument(
        "--nodes", type=int, nargs="+", default=[1], help="node counts to sweep (sbatch --nodes)"
    )
    p.add_argument(
        "--ntasks-per-node",
        type=int,
        nargs="+",
        default=[1],
        help="ranks per node to sweep (sbatch --ntasks-per-node)",
    )
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        help="cores per rank (sbatch --cpus-per-task); default: the template's",
    )
    p.add_argument(
        "--algos",
        nargs="+",
        default=["local-sgd"],
        help="--algo values to sweep (exported as ALGO)",
    )
    p.add_argument(
        "--updates",
        nargs="+",
        default=None,
        help="--update rules to sweep (exported as UPDATE); default: the template's",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="workers per rank to sweep (exported as WORKERS); default: the template's",
    )
    p.add_argument("--epochs", default=None, help="EPOCHS for every point")
    p.add_argument("--data-dir", default=None, help="DATA_DIR for every point")
    p.add_argument("--dataset", default=None, help="DATASET override for every point")
    p.add_argument("--model", default=None, help="MODEL override for every point")
    p.add_argument(
        "--extra-args", default=None, help="EXTRA_ARGS appended to hpc-asgd train on every point"
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="more knobs for every point (LAUNCHER=mpirun, VENV=..., PRESET=...); repeatable",
    )
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option for every job, e.g. --sbatch-arg=--time=30 "
        "--sbatch-arg=--partition=gpu; repeatable",
    )
    p.add_argument(
        "--mode",
        choices=["jobs", "chain", "array"],
        default="jobs",
        help="independent jobs, a chain of dependent jobs (one at a time), "
        "or one job array per resource shape",
    )
    p.add_argument(
        "--name", default="study", help="prefix of the job names and of the point folders"
    )
    p.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="folder of the study (points, logs, study.json, study.csv, study.md); "
        "default: runs/<name>-<timestamp>",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch commands (and array wrappers) without submitting or writing",
    )
    p.add_argument(
        "--wait", action="store_true", help="wait for the jobs to end, then gather the results"
    )
    p.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits at most"
    )
    p.add_argument("--poll", type=float, default=5.0, help="seconds between squeue polls")
    p.add_argument(
        "--gather-only",
        action="store_true",
        help="submit nothing: gather the summaries under --out-root into the tables",
    )
    p.add_argument(
        "--sbatch", default="sbatch", help="sbatch executable (squeue/scontrol: from PATH)"
    )
    args = p.parse_args(argv)
    for item in args.export:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, flags=re.DOTALL):
            p.error(f"--export {item!r}: expected VAR=VALUE")
    if args.gather_only and args.out_root is None:
        p.error("--gather-only needs --out-root")
    if not args.gather_only and not args.template.is_file():
        p.error(f"--template {args.template}: no such file")
    if args.out_root is None:
        args.out_root = Path("runs") / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def plan(args: argparse.Namespace) -> list[Point]:
    out_root = args.out_root.resolve()
    common: dict[str, str] = {}
    for var, value in (
        ("EPOCHS", args.epochs),
        ("DATA_DIR", args.data_dir),
        ("DATASET", args.dataset),
        ("MODEL", args.model),
        ("EXTRA_ARGS", args.extra_args),
    ):
        if value is not None:
            common[var] = str(value)
    for item in args.export:
        var, value = item.split("=", 1)
        common[var] = value
    points = []
    for nodes, tpn, algo, update, workers in itertools.product(
        args.nodes, args.ntasks_per_node, args.algos, args.updates or [None], args.workers or [None]
    ):
        name = f"{args.name}-{algo}" + (f"-{update}" if update else "") + f"-n{nodes}x{tpn}"
        name += f"-w{workers}" if workers else ""
        env = dict(common, ALGO=algo, OUT_DIR=str(out_root / name))
        if update:
            env["UPDATE"] = update
        if workers:
            env["WORKERS"] = str(workers)
        points.append(Point(name, nodes, tpn, algo, update, workers, env["OUT_DIR"], env=env))
    return points


def sbatch_base(args: argparse.Namespace, nodes: int, tpn: int) -> list[str]:
    cmd = [args.sbatch, "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tpn}"]
    if args.cpus_per_task:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")
    return cmd + list(args.sbatch_arg)


def show(env: dict[str, str], cmd: list[str]) -> str:
    return " ".join(
        [f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd]
    )


def array_wrapper(template: Path, points: list[Point]) -> str:
    """A batch script with the template's #SBATCH lines that runs the template for one point."""
    text = template.read_text()
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    lines = ["#!/usr/bin/env bash", *directives]
    lines += [
        "# Generated by scripts/scaling_study.py: array task i runs point i of the study.",
        "set -euo pipefail",
        'case "${SLURM_ARRAY_TASK_ID:?not an array task}" in',
    ]
    for i, pt in enumerate(points):
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in pt.env.items())
        lines.append(f"  {i}) export {exports} ;;")
    lines += [
        '  *) echo "hpc-asgd: error: no study point for array task $SLURM_ARRAY_TASK_ID" >&2; '
        "exit 1 ;;",
        "esac",
        f"export HPC_ASGD_HOME=${{HPC_ASGD_HOME:-{shlex.quote(str(ROOT))}}}",
        f"exec bash {shlex.quote(str(template.resolve()))}",
        "",
    ]
    return "\n".join(lines)


def run_sbatch(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"scaling_study: sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit(args: argparse.Namespace, points: list[Point]) -> list[Point]:
    out_root = args.out_root.resolve()
    logs = out_root / "logs"
    template = args.template.resolve()
    if not args.dry_run:
        logs.mkdir(parents=True, exist_ok=True)
    if args.mode == "array":
        shapes: dict[tuple[int, int], list[Point]] = {}
        for pt in points:
            shapes.setdefault((pt.nodes, pt.ranks_per_node), []).append(pt)
        for (nodes, tpn), group in shapes.items():
            wrapper = out_root / f"array-n{nodes}x{tpn}.sh"
            cmd = sbatch_base(args, nodes, tpn)
            cmd += [
                f"--array=0-{len(group) - 1}",
                f"--job-name={args.name}-n{nodes}x{tpn}",
                f"--output={logs}/%x-%A_%a.out",
                str(wrapper),
            ]
            if args.dry_run:
                print(f"# {wrapper}:")
                print("\n".join("#   " + ln for ln in array_wrapper(template, group).splitlines()))
                print(show({}, cmd))
                continue
            wrapper.write_text(array_wrapper(template, group))
            job = run_sbatch(cmd, {})
            for i, pt in enumerate(group):
                pt.job = f"{job}_{i}"
            print(f"submitted array {job}: {len(group)} points on {nodes} node(s) x {tpn} rank(s)")
        return points
    prev = ""
    for pt in points:
        cmd = sbatch_base(args, pt.nodes, pt.ranks_per_node)
        cmd += [f"--job-name={pt.name}", f"--output={logs}/%x-%j.out"]
        if args.mode == "chain":
            dep = prev or ("$PREVIOUS_JOB" if args.dry_run and pt is not points[0] else "")
            if dep:
                cmd.append(f"--dependency=afterany:{dep}")
        cmd.append(str(template))
        if args.dry_run:
            print(show(pt.env, cmd))
            continue
        pt.job = prev = run_sbatch(cmd, pt.env)
        print(f"submitted {pt.job}: {pt.name}")
    return points


# --------------------------------------------------------------------------- waiting, gathering


def job_states(jobs: list[str]) -> dict[str, str]:
    """State of each job or array task, from scontrol (finished jobs stay for MinJobAge)."""
    states: dict[str, str] = {}
    for base in sorted({j.split("_")[0] for j in jobs if j}):
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", base], capture_output=True, text=True, check=False
        )
        for line in proc.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            state = f.get("JobState", "")
            if f.get("ArrayJobId") and f.get("ArrayTaskId", "").isdigit():
                states[f"{f['ArrayJobId']}_{f['ArrayTaskId']}"] = state
            if f.get("JobId"):
                states[f["JobId"]] = state
    return states


def wait(points: list[Point], timeout: float, poll: float) -> None:
    jobs = [pt.job for pt in points if pt.job]
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(sorted({j.split("_")[0] for j in jobs}))],
            capture_output=True,
            text=True,
            check=False,
        )
        left = proc.stdout.split() if proc.returncode == 0 else []
        if not left:
            return
        if time.monotonic() > deadline:
            sys.exit(f"scaling_study: {len(left)} job(s) still queued or running after {timeout} s")
        time.sleep(poll)


def fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def gather(out_root: Path, points: list[Point] | None) -> list[dict]:
    out_root = out_root.resolve()
    if points is None:  # no study.json: every folder with a summary.json is a point
        points = [
            Point(p.parent.name, 0, 0, "", None, None, str(p.parent))
            for p in sorted(out_root.glob("*/summary.json"))
        ]
    states = job_states([pt.job for pt in points])
    rows = []
    for pt in points:
        path = Path(pt.out_dir) / "summary.json"
        s = json.loads(path.read_text()) if path.is_file() else {}
        world = s.get("world_size")
        nodes = pt.nodes or None
        row = {
            "point": pt.name,
            "algo": s.get("algo", pt.algo),
            "update": s.get("update", pt.update),
            "nodes": nodes,
            "ranks_per_node": pt.ranks_per_node or None,
            "world_size": world,
            "workers": s.get("workers_per_rank", pt.workers),
            "samples_per_s": s.get("samples_per_s"),
            "speedup": None,
            "efficiency": None,
            "final_test_acc": s.get("final_test_acc"),
            "final_test_loss": s.get("final_test_loss"),
            "wall_s": s.get("wall_s"),
            "averaging_rounds": s.get("averaging_rounds"),
            "epochs": s.get("epochs"),
            "dataset": s.get("dataset"),
            "model": s.get("model"),
            "job": pt.job,
            "state": states.get(pt.job, "") if pt.job else "",
            "out_dir": pt.out_dir,
        }
        if not s:
            row["state"] = row["state"] or "no summary.json"
        rows.append(row)
    # Speed-up against the smallest total worker count of the same algorithm and update rule.
    for row in rows:
        if not row["samples_per_s"] or not row["world_size"]:
            continue
        units = row["world_size"] * (row["workers"] or 1)
        peers = [
            r
            for r in rows
            if r["samples_per_s"]
            and r["world_size"]
            and (r["algo"], r["update"]) == (row["algo"], row["update"])
        ]
        base = min(peers, key=lambda r: r["world_size"] * (r["workers"] or 1))
        base_units = base["world_size"] * (base["workers"] or 1)
        row["speedup"] = row["samples_per_s"] / base["samples_per_s"]
        row["efficiency"] = row["speedup"] * base_units / units
    return rows


def write_tables(out_root: Path, rows: list[dict]) -> tuple[Path, Path]:
    csv_path, md_path = out_root / "study.csv", out_root / "study.md"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    shown = [c for c in COLUMNS if c not in ("out_dir", "point")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in shown) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def report_plots(out_root: Path) -> None:
    """The study's plots and report (``hpc-asgd report``'s code) in ``<out-root>/report``."""
    from hpc_asgd.tools.report import ReportError, write_report

    try:
        print(f"report: {write_report([out_root], out_root / 'report')}")
    except ReportError as e:
        print(f"scaling_study: no report: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_root = args.out_root.resolve()
    study = out_root / "study.json"
    if args.gather_only:
        points = None
        if study.is_file():
            points = [Point(**p) for p in json.loads(study.read_text())["points"]]
    else:
        points = submit(args, plan(args))
        if args.dry_run:
            return 0
        study.write_text(
            json.dumps(
                {
                    "template": str(args.template.resolve()),
                    "mode": args.mode,
                    "argv": sys.argv[1:] if argv is None else argv,
                    "points": [asdict(p) for p in points],
                },
                indent=2,
            )
        )
        print(f"study: {study}")
        if not args.wait:
            print(f"gather later: python {Path(__file__).name} --out-root {out_root} --gather-only")
            return 0
        wait(points, args.timeout, args.poll)
    rows = gather(out_root, points)
    csv_path, md_path = write_tables(out_root, rows)
    print(md_path.read_text(), end="")
    print(f"tables: {csv_path} {md_path}")
    report_plots(out_root)
    missing = [r["point"] for r in rows if r["samples_per_s"] is None]
    if missing:
        print(f"scaling_study: no results for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
