"""``hpc-asgd predict``'s driver: scenarios from the command line, tables, the plot, and the
leave-one-out validation of ``--calibrate``d runs (the model: :mod:`hpc_asgd.tools.predict`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hpc_asgd.tools.predict import (
    ALGOS,
    INTERCONNECTS,
    PASSES,
    WORKLOADS,
    Algo,
    Compute,
    Machine,
    PredictError,
    Run,
    Workload,
    calibrate,
    chosen,
    load_run,
    own_compute,
    predict,
)
from hpc_asgd.tools.safe_io import Outputs, one_line_errors, say

PERIODIC = ("local-sgd", "lasgd", "local-async", "hier-avg", "hier-avg-nb")
NODES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
GOAL = 0.9  # the efficiency the projection asks which K keeps


def add_arguments(p: argparse.ArgumentParser) -> None:
    one_line_errors(p)
    add = p.add_argument
    add(
        "--model",
        nargs="+",
        default=["resnet50"],
        metavar="NAME",
        help=f"workloads: {', '.join(WORKLOADS)} (their assumed step times: "
        "docs/outputs-and-reports.md), or custom with --params",
    )
    add("--params", type=int, default=0, help="a model's parameters, float32 (0: the workload's)")
    add(
        "--step-ms",
        type=float,
        default=0.0,
        help="mean compute time of a node step, ms (0: the workload's)",
    )
    add("--step-cv", type=float, default=0.05, help="its coefficient of variation (lognormal)")
    add("--batch-size", type=int, default=0, help="samples per node step (0: the workload's)")
    add(
        "--interconnect",
        nargs="+",
        default=["ndr400"],
        choices=list(INTERCONNECTS),
        help="named interconnects (effective figures: docs/outputs-and-reports.md)",
    )
    add("--latency-us", type=float, default=0.0, help="instead of a named interconnect's")
    add("--bandwidth-gbs", type=float, default=0.0, help="GB/s, instead of a named one's")
    add(
        "--allreduce",
        default="auto",
        choices=["auto", "ring", "tree", "rabenseifner"],
        help="the allreduce algorithm's cost (auto: the cheapest)",
    )
    add(
        "--algo",
        nargs="+",
        default=["sync", "local-sgd", "lasgd", "local-async", "hier-avg"],
        choices=[a for a in ALGOS if a != "none"],
        dest="algos",
        help="algorithms (hier-avg-nb: --hier-mode nonblocking)",
    )
    add(
        "--period",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8, 16, 32, 64, 128],
        help="K values (hier-avg: K1 x K2 = K with K1 = --local-period)",
    )
    add("--local-period", nargs="+", type=int, default=[2], help="hier-avg's K1 values")
    add("--group-size", type=int, default=8, help="hier-avg's S (nodes per group)")
    add("--nodes", nargs="+", type=int, default=list(NODES), help="node counts N")
    add(
        "--straggler-rate",
        nargs="+",
        type=float,
        default=[0.0],
        help="probability that a node's step is a straggler's",
    )
    add("--straggler-factor", type=float, default=2.0, help="how much longer such a step takes")
    add(
        "--mem-gbs",
        type=float,
        default=500.0,
        help="memory bandwidth for a round's passes over the model (GB/s)",
    )
    add(
        "--plot-period",
        type=int,
        default=0,
        help="the K whose efficiency the plot shows (0: 16, or the middle of --period)",
    )
    add(
        "--calibrate",
        nargs="+",
        type=Path,
        default=[],
        metavar="RUN_DIR",
        help="fit compute, network and round cost to these runs' summary.json",
    )
    add(
        "--validate",
        action="store_true",
        help="with --calibrate: predict each run from a fit to the others",
    )
    add(
        "--compute-from",
        default="none",
        choices=["none", "own"],
        help="--validate: the compute time from the --algo none runs, or each run's own steps",
    )
    add("--out", type=Path, default=None, help="write predict.md, predict.json, predict.png")


# every numeric flag's range: (lowest, highest); 0 stands for "the workload's" where allowed
INTS = {
    "params": (0, 10**13),
    "batch_size": (0, 10**9),
    "group_size": (1, 1 << 20),
    "nodes": (1, 1 << 20),
    "period": (1, 4096),  # each K is K draws per node step simulated
    "local_period": (1, 4096),
    "plot_period": (0, 4096),
}
FLOATS = {
    "step_ms": (0.0, 1e9),
    "step_cv": (0.0, 10.0),
    "latency_us": (0.0, 1e9),
    "bandwidth_gbs": (0.0, 1e9),
    "mem_gbs": (1e-6, 1e9),
    "straggler_factor": (1.0, 1e6),
}


def check(args: argparse.Namespace) -> None:
    for name, (least, most) in INTS.items():
        given = getattr(args, name)
        for v in given if isinstance(given, list) else [given]:
            if not least <= v <= most:
                flag = f"--{name.replace('_', '-')}"
                raise PredictError(f"{flag}: {v} is not in [{least}, {most:,}]")
    for name, (lo, hi) in FLOATS.items():
        x = getattr(args, name)
        if not (math.isfinite(x) and lo <= x <= hi):
            flag = f"--{name.replace('_', '-')}"
            raise PredictError(f"{flag}: {x} is not a finite number in [{lo:g}, {hi:g}]")
    if 0 < args.bandwidth_gbs < 1e-6:
        raise PredictError("--bandwidth-gbs: 0 (the interconnect's) or at least 1e-06")
    bad = [m for m in args.model if m not in WORKLOADS and m != "custom"]
    if bad:
        raise PredictError(f"--model: unknown {bad}; known: {', '.join(WORKLOADS)} or custom")
    if "custom" in args.model and not (args.params > 0 and args.step_ms > 0 and args.batch_size):
        raise PredictError("--model custom needs --params, --step-ms and --batch-size")
    if args.validate and not args.calibrate:
        raise PredictError("--validate needs --calibrate RUN_DIR...")
    if any(not 0 <= r < 1 for r in args.straggler_rate):
        raise PredictError("--straggler-rate in [0, 1): the probability of a straggler's step")
    if not args.plot_period:  # 16, or the middle K given
        args.plot_period = 16 if 16 in args.period else sorted(args.period)[len(args.period) // 2]
    if args.plot_period not in args.period:
        raise PredictError(f"--plot-period {args.plot_period} is not one of --period")
    if not configs(args):
        raise PredictError("--algo hier-avg: no --period K is a multiple of a --local-period")


def configs(args: argparse.Namespace) -> list[Algo]:
    out = []
    for algo in args.algos:
        if algo not in PERIODIC:
            out.append(Algo(algo))
            continue
        for k in args.period:
            if algo.startswith("hier-avg"):
                out += [
                    Algo(algo, k, k1, k // k1, args.group_size)
                    for k1 in args.local_period
                    if k % k1 == 0
                ]
            else:
                out.append(Algo(algo, k))
    return out


def workload(args: argparse.Namespace, name: str) -> Workload:
    base = WORKLOADS.get(name) or Workload("custom", args.params, args.params, 0.0, 1)
    params = args.params or base.params
    return Workload(
        base.name,
        params,
        base.floats if not args.params else params,
        args.step_ms / 1e3 or base.step_s,
        args.batch_size or base.batch,
        base.note,
    )


def machine(args, link: str, w: Workload, rate: float) -> Machine:
    net = INTERCONNECTS[link]
    compute = Compute.lognormal(
        w.step_s, args.step_cv, straggler_rate=rate, straggler_factor=args.straggler_factor
    )
    return Machine(
        args.latency_us * 1e-6 or net.latency_s,
        args.bandwidth_gbs * 1e9 or net.bandwidth,
        compute,
        PASSES * 4.0 * w.floats / (args.mem_gbs * 1e9),
        args.allreduce,
        net.name,
    )


def scenarios(args: argparse.Namespace) -> list[dict]:
    """Every (workload, interconnect, straggler rate): predictions for each config and N."""
    out = []
    for name in args.model:
        w = workload(args, name)
        for link in args.interconnect:
            for rate in args.straggler_rate:
                m = machine(args, link, w, rate)
                title = f"{w.name} on {m.source}, straggler rate {rate:g}"
                out.append(scenario(args, title, w, link, rate, m))
    return out


def scenario(args, title: str, w: Workload, link: str, rate: float, m: Machine) -> dict:
    """Workload ``w`` on machine ``m``: each config at each N (hier-avg: where S divides N)."""
    preds = [
        predict(a, n, m, w.floats, w.params, w.batch)
        for a in configs(args)
        for n in args.nodes
        if not (a.algo.startswith("hier-avg") and n % min(a.group_size, n))
    ]
    if not preds:
        raise PredictError(f"--group-size {args.group_size} divides none of --nodes (hier-avg)")
    return {
        "title": title,
        "workload": asdict(w),
        "link": link,
        "straggler_rate": rate,
        "latency_s": m.latency_s,
        "bandwidth": m.bandwidth,
        "round_overhead_s": m.round_overhead_s,
        "allreduce_at_max_nodes": chosen(
            4.0 * w.floats, max(args.nodes), m.latency_s, m.bandwidth, m.allreduce
        ),
        "predictions": [asdict(p) for p in preds],
    }


def smallest_k(preds: list[dict], algo: str, n: int) -> str:
    """The smallest K whose efficiency at ``n`` nodes is >= GOAL (hier-avg: with its K1;
    non-blocking: with the rounds' actual spacing when the allreduce outlasts K steps)."""
    fine = [
        (k_of(p["label"]), p)
        for p in preds
        if p["algo"] == algo and p["nodes"] == n and p["efficiency"] >= GOAL
    ]
    if not fine:
        return "none"
    k, p = min(fine, key=lambda x: x[0])
    if algo.startswith("hier-avg"):
        return f"{k} (K1={p['label'].split('K1=')[1].split()[0]})"
    keff = p.get("effective_period")
    return f"{k} (K_eff {keff:.1f})" if keff and keff > 1.05 * k else str(k)


def k_of(label: str) -> int:
    """K of a label: ``lasgd K=8`` or ``hier-avg S=8 K1=2 K2=4`` (K1 x K2)."""
    parts = dict(x.split("=") for x in label.split()[1:])
    return int(parts["K"]) if "K" in parts else int(parts["K1"]) * int(parts["K2"])


def markdown(args: argparse.Namespace, scens: list[dict], validation: dict | None) -> str:
    lines = ["# hpc-asgd predict", ""]
    if validation:
        lines += validation_md(validation)
    for s in scens:
        preds = s["predictions"]
        algos = list(dict.fromkeys(p["algo"] for p in preds))
        nodes = sorted({p["nodes"] for p in preds})
        lines += [
            f"## {s['title']}",
            "",
            f"{s['workload']['params']:,} parameters; latency {s['latency_s'] * 1e6:g} us, "
            f"bandwidth {s['bandwidth'] / 1e9:g} GB/s, allreduce {args.allreduce} "
            f"({s['allreduce_at_max_nodes']} at {max(nodes)} nodes), round overhead "
            f"{s['round_overhead_s'] * 1e3:.3g} ms.",
            "",
            f"Smallest K that keeps efficiency >= {GOAL} (sync: its efficiency):",
            "",
            "| nodes | " + " | ".join(algos) + " |",
            "|---:|" + "---:|" * len(algos),
        ]
        for n in nodes:
            cells = []
            for a in algos:
                if a == "sync":
                    e = next(p["efficiency"] for p in preds if p["algo"] == a and p["nodes"] == n)
                    cells.append(f"{e:.2f}")
                else:
                    cells.append(smallest_k(preds, a, n))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Efficiency and samples/s at K = {args.plot_period}:",
            "",
            "| config | " + " | ".join(str(n) for n in nodes) + " |",
            "|---|" + "---:|" * len(nodes),
        ]
        for label in dict.fromkeys(p["label"] for p in preds if shown(p, args.plot_period)):
            row = {p["nodes"]: p for p in preds if p["label"] == label}
            cells = [
                f"{row[n]['efficiency']:.2f} ({row[n]['samples_per_s']:,.0f})" if n in row else ""
                for n in nodes
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def shown(p: dict, k: int) -> bool:
    return "=" not in p["label"] or k_of(p["label"]) == k


def validation_md(v: dict) -> list[str]:
    lines = [
        "## Predicted against measured",
        "",
        "Each configuration (its repeats together) predicted from a fit to the other runs; "
        + (
            "compute per step from the run's own steps."
            if v["compute_from"] == "own"
            else "compute per step from the --algo none runs."
        ),
        "",
        "| algo | nodes | runs | measured samples/s (median) | predicted | error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in v["rows"]:
        lines.append(
            f"| {r['label']} | {r['nodes']} | {len(r['runs'])} | {r['measured']:,.0f} "
            f"| {r['predicted']:,.0f} | {r['error'] * 100:+.1f}% |"
        )
    f = v["fit"]
    lines += [
        "",
        f"Fit to all runs: latency {f['latency_s'] * 1e6:.1f} us, bandwidth "
        f"{f['bandwidth'] / 1e6:.1f} MB/s, round overhead {f['round_overhead_s'] * 1e3:.2f} "
        f"ms; compute per node step {f['compute_s']} (s, by world size). Largest error "
        f"{v['max_abs_error'] * 100:.1f}%.",
        "",
    ]
    return lines


def validate(runs: list[Run], how: str, own: bool = False) -> dict:
    """Each configuration measured (algorithm, periods, nodes; its repeats together) predicted
    from a fit to the runs of every other configuration: leave one configuration out.
    ``own``: the compute time of each run is its own steps' (``--compute-from own``), so that
    only the communication and the waiting are predicted."""
    configs: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.algo != "none":
            configs.setdefault((r.algo_cfg, r.nodes), []).append(r)
    if not configs:
        raise PredictError("--validate: no run but --algo none ones to predict")
    rows = []
    for (a, n), mine in configs.items():
        m = calibrate([r for r in runs if (r.algo_cfg, r.nodes) != (a, n)], how, own)
        machine = m[min(m, key=lambda x: abs(x - n))]
        if own:
            machine = replace(machine, compute=own_compute(mine))
        r = mine[0]
        p = predict(a, n, machine, r.floats, r.params, r.batch)
        # the run as measured: its steps at the steady rate, then its end (``tail_s``)
        steps = float(np.median([x.steps for x in mine]))
        predicted = n * r.batch * steps / (steps * p.step_s + p.tail_s)
        measured = float(np.median([x.samples_per_s for x in mine]))
        rows.append(
            {
                "runs": [x.path.name for x in mine],
                "label": a.label(),
                "nodes": n,
                "measured": measured,
                "measured_all": [x.samples_per_s for x in mine],
                "predicted": predicted,
                "error": predicted / measured - 1,
            }
        )
    full = calibrate(runs, how, own)
    any_m = next(iter(full.values()))
    fit = {
        "latency_s": any_m.latency_s,
        "bandwidth": any_m.bandwidth,
        "round_overhead_s": any_m.round_overhead_s,
        "compute_s": {n: round(m.compute.mean_s, 6) for n, m in full.items() if n > 1},
    }
    worst = max(abs(r["error"]) for r in rows)
    return {
        "rows": rows,
        "fit": fit,
        "max_abs_error": worst,
        "compute_from": "own" if own else "none",
    }


def plot(scens: list[dict], k: int):
    """The efficiency at K = ``k`` against the nodes, a panel per scenario (a figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(scens))
    rows = math.ceil(len(scens) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, s in zip(axes.flat, scens, strict=False):
        preds = [p for p in s["predictions"] if shown(p, k)]
        for label in dict.fromkeys(p["label"] for p in preds):
            pts = sorted((p["nodes"], p["efficiency"]) for p in preds if p["label"] == label)
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
        ax.axhline(GOAL, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(s["title"].replace(" on ", "\n", 1), fontsize=8)
        ax.set_xlabel("nodes")
        ax.set_ylabel("parallel efficiency")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(scens) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> int:
    check(args)
    note = None
    with contextlib.ExitStack() as stack:  # --out made first: a bad one fails before the work
        files = stack.enter_context(Outputs(args.out, PredictError)) if args.out else None
        validation = None
        if args.calibrate:
            runs = [load_run(d) for d in args.calibrate]
            if args.validate:
                validation = validate(runs, args.allreduce, args.compute_from == "own")
            scens = calibrated_scenarios(args, runs)
        else:
            scens = scenarios(args)
        text = markdown(args, scens, validation)
        if files:
            note = write(files, args, scens, validation, text)
    say(text, PredictError)
    if note:
        say(note, PredictError)
    return 0


def write(files: Outputs, args, scens: list[dict], validation: dict | None, text: str):
    """predict.json, predict.md and predict.png, each whole or none (temporary names until
    all are written); a note if there is no plot."""
    doc = {
        "validation": validation,
        "scenarios": scens,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    data = json.dumps(doc, indent=1, default=str).encode()
    files.write("predict.json", lambda f: f.write(data))
    files.write("predict.md", lambda f: f.write(text.encode("utf-8", "backslashreplace")))
    note = None
    try:
        fig = plot(scens, args.plot_period)
    except ImportError:
        note = "hpc-asgd predict: no plot without matplotlib: pip install 'hpc_asgd[plot]'"
    else:
        import matplotlib.pyplot as plt

        try:
            files.write("predict.png", lambda f: fig.savefig(f, format="png", dpi=90))
        finally:
            plt.close(fig)
    files.commit()
    return note


def calibrated_scenarios(args: argparse.Namespace, runs: list[Run]) -> list[dict]:
    """The measured machine (its largest world size's compute) with the runs' workload."""
    machines = calibrate(runs, args.allreduce)
    top = machines[max(machines)]
    r = runs[0]
    name = f"the runs' model ({r.params:,} parameters)"
    w = Workload(name, r.params, r.floats, top.compute.mean_s, r.batch)
    out = []
    for rate in args.straggler_rate:
        compute = Compute(top.compute.mean_s, top.compute.shape, rate, args.straggler_factor)
        m = replace(top, compute=compute, allreduce=args.allreduce)
        title = f"{w.name} on the calibrated machine, straggler rate {rate:g}"
        out.append(scenario(args, title, w, "calibrated", rate, m))
    return out
