"""``hpc-asgd predict`` against the emulated cluster: samples/s predicted and measured for sync,
local-sgd, lasgd and hier-avg at 2 and 4 emulated nodes, links uncapped and tbf-capped.

With ``--measure`` it first runs ``compare.py --nodes N --keep-runs`` for N = 2 and 4 (root;
``scripts/slurm_local.sh start --nodes 4`` first), keeping every run's folder under
``--runs``; then, for each (nodes, links) set, each configuration is predicted from a fit to
the set's other runs (leave one configuration out; ``--algo none`` runs give the compute
time), once with the compute time of the ``--algo none`` runs and once with each run's own
steps' (``--compute-from own``: only the communication and the waiting are predicted).
Outputs ``<out>/<stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import _harness as h

from hpc_asgd.tools.predict import load_run
from hpc_asgd.tools.predict_cli import validate

LINKS = ("uncapped", "all-capped")
NODES = (2, 4)
CONTENDERS = ("none", "sync", "local-sgd", "lasgd", "hier-avg")


def measure(args: argparse.Namespace) -> None:
    for n in NODES:
        cmd = [
            sys.executable,
            str(h.ROOT / "benchmarks" / "compare.py"),
            "--nodes",
            str(n),
            "--contenders",
            *CONTENDERS,
            "--links",
            *LINKS,
            "--repeats",
            str(args.repeats),
            "--epochs",
            str(args.epochs),
            "--keep-runs",
            str(Path(args.runs) / f"n{n}"),
            "--out",
            args.out,
            "--stem",
            f"{args.stem}_compare_n{n}",
        ]
        subprocess.run(cmd, check=True)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = h.new_report("predict_validation", argv, args)
    if args.measure:
        measure(args)
    sets = []
    for n in NODES:
        for link in LINKS:
            folders = sorted((Path(args.runs) / f"n{n}").glob(f"{link}-*"))
            if not folders:
                sys.exit(
                    f"predict_validation.py: no runs in {args.runs}/n{n}/{link}-* "
                    "(run with --measure)"
                )
            runs = [load_run(f) for f in folders]
            both = {src: validate(runs, "auto", src == "own") for src in ("none", "own")}
            sets.append({"nodes": n, "links": link, "runs": len(runs), **both})
    report["sets"] = sets
    h.write_report(report, markdown, args.stem)
    return 0


def markdown(report: dict) -> str:
    lines = h.header(report, "hpc-asgd predict against measured samples/s (emulated nodes)")
    lines += [
        f"Runs: `{report['args']['runs']}/nN`, made by `--measure` or by "
        "`python benchmarks/compare.py --nodes N --contenders none sync local-sgd lasgd "
        "hier-avg --links uncapped all-capped --epochs 8 --keep-runs RUNS/nN` (N = 2, 4; "
        "cnn on digits, batch 16 per rank, K = 8, hier-avg K1 = 2 and S = N / 2; links "
        "capped at 100 Mbit/s by tc tbf). Medians over the repeats.",
    ]
    rows, worst = [], {"none": 0.0, "own": 0.0}
    for s in report["sets"]:
        by = {src: {r["label"]: r for r in s[src]["rows"]} for src in ("none", "own")}
        for label, r in by["none"].items():
            o = by["own"][label]
            worst = {
                "none": max(worst["none"], abs(r["error"])),
                "own": max(worst["own"], abs(o["error"])),
            }
            rows.append(
                [
                    label,
                    s["nodes"],
                    s["links"],
                    f"{r['measured']:,.0f} ({len(r['runs'])})",
                    f"{r['predicted']:,.0f}",
                    f"{r['error'] * 100:+.1f}%",
                    f"{o['predicted']:,.0f}",
                    f"{o['error'] * 100:+.1f}%",
                ]
            )
    head = [
        "config",
        "nodes",
        "links",
        "measured samples/s (runs)",
        "predicted (compute of none runs)",
        "error",
        "predicted (runs' own compute)",
        "error",
    ]
    lines += ["", *h.table(head, rows, "lrlrrrrr"), ""]
    within = {
        src: sum(abs(r["error"]) <= 0.15 for s in report["sets"] for r in s[src]["rows"])
        for src in ("none", "own")
    }
    total = sum(len(s["none"]["rows"]) for s in report["sets"])
    lines.append(
        f"Within 15%: {within['none']} of {total} (compute of the none runs), "
        f"{within['own']} of {total} (the runs' own compute); largest errors "
        f"{worst['none'] * 100:.1f}% and {worst['own'] * 100:.1f}%."
    )
    lines += ["", "Fits (all runs of a set, compute of the none runs):", ""]
    for s in report["sets"]:
        f = s["none"]["fit"]
        lines.append(
            f"- {s['nodes']} nodes, {s['links']}: latency {f['latency_s'] * 1e6:.0f} us, "
            f"bandwidth {f['bandwidth'] / 1e6:.1f} MB/s, round overhead "
            f"{f['round_overhead_s'] * 1e3:.2f} ms, compute {f['compute_s']} s per step"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.options(
        p,
        ("--runs", "/var/tmp/hpc_asgd_validation", "the kept run folders: RUNS/n2, RUNS/n4"),
        ("--measure", False, "run compare.py first (root, 4 emulated nodes started)"),
        ("--repeats", 3),
        ("--epochs", 8.0),
        h.OUT,
        ("--stem", "predict_validation", "output files <out>/<stem>.json and .md"),
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return driver(parse(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
