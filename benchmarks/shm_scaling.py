"""Samples/s of W shared-memory workers (one rank) against a PyTorch ``mnist_hogwild`` peer.

Contenders per (model, W): our update rules (``python -m hpc_asgd.cli train --update RULE
--workers W``, ``summary.json["samples_per_s"]``: training time only) and ``peers/hogwild.py``
(timed from a start barrier to the end of its last process), with the same model, data, batch
order, steps, SGD and torch threads per process. Every repeat runs each contender once, in
rotated order, as a fresh process tree; disturbed runs are retried. Medians, paired ratios.
Outputs ``<out>/shm_scaling.json`` and ``.md``. ``--profile RULE`` prints cProfile tables of
our worker 0 and the peer's. See benchmarks/README.md.

``--epochs E --eval-every F`` (the Leashed-SGD paper's setting: ``--epochs 50 --eval-every 1
--lr 0.05 --momentum 0``) trains E epochs with an evaluation every F, and adds per run: samples/s
with the evaluations (over ``summary.json``'s ``run_s``, first step to the end of the final
evaluation), launch to first step (``launch_s``), the main process's CPU share, the staleness
tail; per rule the per-step overhead above a bare PyTorch step (``step_overhead.py``); and the
floor of any launch, ``python -c "import torch"``. Outputs ``<out>/<--stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
import step_overhead
from peers.hogwild import MARK

RULES = ("hogwild", "leashed", "locked", "partitioned")
CONTENDERS = (*RULES, "peer")
# model -> (dataset, steps per run): about 2 s of training at W = 1 on a 2-core machine.
MODELS = {"mlp": ("mnist", 3000), "cnn": ("mnist", 200), "resnet20": ("synthetic", 64)}
GOALS_SPEEDUP = {"cnn": 1.9, "mlp": 1.75}  # W=2 vs W=1, stated by the issue
PEER_REFERENCE = {"cnn": 1.92, "mlp": 1.57}  # the issue author's peer-style W=2 speedups
PEER = str(Path(__file__).resolve().parent / "peers" / "hogwild.py")
OVERHEAD = str(Path(__file__).resolve().parent / "step_overhead.py")
# --epochs: the goals at W = 2 (the Leashed-SGD paper's setting, evaluations included)
EPOCH_GOALS = {"speedup": 1.8, "overhead_ms": 0.1, "stale15": 0.001, "launch_s": 1.5}


def make_case(args, model: str, data_dir: str, verify: bool) -> dict:
    """The data and step count of one model, as every contender gets them."""
    from hpc_asgd.data import load_dataset

    dataset, steps = MODELS[model]
    steps = max(1, round(steps * args.steps_scale))
    case = {"dataset": dataset, "data_dir": data_dir if dataset == "mnist" else None}
    case.update(steps=steps, verify=verify or dataset != "mnist", model=model)
    case["synthetic_size"] = args.synthetic_size or max(steps * args.batch_size, 512)
    data = load_dataset(dataset, case["data_dir"], verify=case["verify"], seed=0,
                        synthetic_size=case["synthetic_size"])  # fmt: skip
    case["n_train"] = len(data.train)
    if args.epochs:  # the run's own count: ceil(epochs x steps per epoch), one rank
        case["steps"] = math.ceil(args.epochs * (case["n_train"] // args.batch_size))
    return case


def ours_cmd(args, case: dict, workers: int, rule: str, out: Path) -> list[str]:
    # epochs such that ceil(epochs * steps_per_epoch) == steps; evaluate only at the end
    epochs = args.epochs or case["steps"] / (case["n_train"] // args.batch_size)
    every = args.eval_every or max(epochs, 1.0)
    return h.train_cmd({
        "dataset": case["dataset"], "data-dir": case["data_dir"], "no-verify": not case["verify"],
        "model": case["model"], "workers": workers, "update": rule,
        "batch-size": args.batch_size, "epochs": repr(epochs), "eval-every": repr(every),
        "lr": args.lr, "momentum": args.momentum, "seed": 0, "out": out,
        "synthetic-size": case["synthetic_size"] if case["dataset"] == "synthetic" else None,
        "threads-per-worker": args.threads or None,
    })  # fmt: skip


def peer_cmd(args, case: dict, workers: int, profile: bool = False) -> list[str]:
    opts = {k: case[k] for k in ("dataset", "data_dir", "verify", "synthetic_size", "steps")}
    opts.update(model=case["model"], workers=workers, batch_size=args.batch_size, lr=args.lr)
    opts.update(momentum=args.momentum, threads=args.threads or max(1, h.cores() // workers))
    return [sys.executable, PEER, json.dumps({**opts, "profile": profile})]


def run_one(args, case: dict, workers: int, contender: str, tmp: Path) -> dict:
    def once() -> dict:
        t0 = time.monotonic()
        if contender == "peer":
            res = h.result_line(h.run_child(peer_cmd(args, case, workers), args.run_timeout), MARK)
        else:
            out = tmp / f"{case['model']}-{workers}-{contender}"
            h.run_child(ours_cmd(args, case, workers, contender, out), args.run_timeout)
            s = json.loads((out / "summary.json").read_text())
            if s["steps_per_rank"] != case["steps"]:
                sys.exit(f"shm_scaling.py: ours ran {s['steps_per_rank']} steps, not {case}")
            res = {
                "samples_per_s": s["samples_per_s"], "train_s": max(s["train_s"]),
                "steps": s["steps_per_rank"], "final_test_acc": s["final_test_acc"],
                "worker_steps": s["workers"]["steps"][0],
            }  # fmt: skip
            if args.epochs:  # the run's whole life, evaluations included
                hist = s["workers"]["staleness_hist"]
                res["samples_per_s_eval"] = round(s["samples_processed"] / max(s["run_s"]), 1)
                res["run_s"], res["launch_s"] = max(s["run_s"]), max(s["launch_s"])
                res["stale15"] = hist[-1] / max(1, sum(hist))  # staleness >= 15
                main_cpu = s["averager_cpu_s"][0]  # null in process (W = 1)
                res["main_cpu_frac"] = main_cpu and main_cpu / max(s["train_s"])
        res["wall_s"] = round(time.monotonic() - t0, 2)
        return res

    return h.guarded(once, args, f"{case['model']} W={workers} {contender}")


def summarise(reps: list[dict]) -> dict:
    v = [r["samples_per_s"] for r in reps]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": reps}


def rates(entry: dict) -> list[float]:
    return [r["samples_per_s"] for r in entry["repeats"]]


def launch_floor(repeats: int) -> dict:
    """Wall seconds of ``python -c "import torch"``: no run of ours can reach its first step
    sooner (the CLI imports torch, and so does each rank)."""
    times = []
    for _ in range(repeats):
        t0 = time.monotonic()
        h.run_child([sys.executable, "-c", "import torch"], 120.0)
        times.append(time.monotonic() - t0)
    return {"median": round(statistics.median(times), 3), "all": [round(t, 3) for t in times]}


def step_overheads(args, data_dir: str, rules: list[str]) -> dict:
    """``step_overhead.py`` per rule (the model of the first ``--models``)."""
    out = {}
    for rule in rules:
        cmd = [sys.executable, OVERHEAD, "--data-dir", data_dir, "--update", rule,
               "--model", args.models[0], "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--momentum", str(args.momentum)]  # fmt: skip
        out[rule] = h.result_line(h.run_child(cmd, args.run_timeout), step_overhead.MARK)
        print(f"  step overhead {rule}: {out[rule]}", flush=True)
    return out


def epoch_figures(results: dict, overheads: dict) -> tuple[dict, list]:
    """--epochs: per (model, W, rule) medians of the extra figures, and the issue's goals."""
    keys = ("samples_per_s_eval", "launch_s", "main_cpu_frac", "stale15", "run_s")
    med = {
        m: {w: {c: {k: h.median([r.get(k) for r in e["repeats"]]) for k in keys}
                for c, e in row.items() if c != "peer"}
            for w, row in by_w.items()}
        for m, by_w in results.items()
    }  # fmt: skip
    g, goals = EPOCH_GOALS, []

    def goal(text: str, c: str, value, met: bool) -> None:
        goals.append({"goal": text, "contender": c, "value": value, "met": met})

    for m, by_w in med.items():
        for c, one in by_w.get("1", {}).items():
            two = by_w.get("2", {}).get(c)
            if two is None:
                continue
            sp = h.ratio(two["samples_per_s_eval"], one["samples_per_s_eval"])
            text = f"{m} W=2 >= {g['speedup']}x W=1, evaluations included"
            goal(text, c, sp, sp is not None and sp >= g["speedup"])
            text = f"{m} W=2 staleness >= 15 in <= {100 * g['stale15']:g}% of updates"
            goal(text, c, two["stale15"], two["stale15"] <= g["stale15"])
            text = f"{m} W=2 launch to first step <= {g['launch_s']} s"
            goal(text, c, two["launch_s"], two["launch_s"] <= g["launch_s"])
    for c, o in overheads.items():
        v = o and o["overhead_vs_bare_ms"]
        text = f"per-step overhead above a bare PyTorch step <= {g['overhead_ms']} ms"
        goal(text, c, v, v is not None and v <= g["overhead_ms"])
    return med, goals


def analyse(results: dict, contenders: list[str]) -> dict:
    """Speedups W=k / W=1 per contender, ours / peer per W, and the issue's goals."""
    speedup: dict = {}
    vs_peer: dict = {}
    goals = []
    for model, by_w in results.items():
        speedup[model] = {c: {} for c in contenders}
        vs_peer[model] = {}
        for w, row in by_w.items():
            for c in row:
                if w != "1" and c in by_w.get("1", {}):
                    speedup[model][c][w] = row[c]["median"] / by_w["1"][c]["median"]
            if "peer" not in row:
                continue
            peer = row["peer"]
            vs_peer[model][w] = {
                c: {"ratio_of_medians": row[c]["median"] / peer["median"],
                    "paired": h.paired(rates(row[c]), rates(peer))}
                for c in contenders
                if c != "peer" and c in row
            }  # fmt: skip
    for model, target in GOALS_SPEEDUP.items():
        for c in contenders:
            got = speedup.get(model, {}).get(c, {}).get("2")
            if got is not None:
                goals.append({"goal": f"{model} W=2 >= {target}x W=1", "contender": c,
                              "value": round(got, 3), "met": got >= target})  # fmt: skip
    for model, by_w in vs_peer.items():
        for w, row in by_w.items():
            for c, r in row.items():
                got = r["ratio_of_medians"]
                goals.append({"goal": f"{model} W={w} ours >= peer", "contender": c,
                              "value": round(got, 3), "met": got >= 1.0})  # fmt: skip
    return {"speedup": speedup, "ours_over_peer": vs_peer, "goals": goals}


def markdown(report: dict) -> str:
    a, cs, an = report["args"], report["args"]["contenders"], report["analysis"]

    def rate(e: dict) -> str:
        return f"{e['median']:.0f} [{e['min']:.0f}-{e['max']:.0f}]"

    def pair(r: dict | None) -> str:
        return f"{r['ratio_of_medians']:.2f} ({r['paired']:.2f})" if r else "-"

    rows = [
        [model, report["steps"][model], w, *(rate(row[c]) if c in row else "-" for c in cs)]
        for model, by_w in report["results"].items()
        for w, row in by_w.items()
    ]
    speedups = [
        [model, w, *(f"{by_c[c][w]:.2f}" if w in by_c.get(c, {}) else "-" for c in cs)]
        for model, by_c in an["speedup"].items()
        for w in sorted({w for d in by_c.values() for w in d}, key=int)
    ]
    title = "Shared-memory workers: samples/s vs W, ours vs an mnist_hogwild-style peer"
    lines = [
        *h.header(report, title),
        f"Batch {a['batch_size']}, lr {a['lr']}, momentum {a['momentum']}; torch threads per "
        f"process: {report['threads']}. Data: {report['data']}.",
        "",
        h.disturbance_line(report),
        "",
        f"Samples/s (training only), median over {a['repeats']} repeats, [min-max] below each.",
        "",
        *h.table(["model", "steps", "W", *cs], rows, "lr"),
        "",
        "Speedup over W=1 of the same contender (ratio of medians).",
        "",
        *h.table(["model", "W", *cs], speedups, "lr"),
    ]
    ours = [c for c in cs if c != "peer"]
    if "peer" in cs and ours:
        vs_peer = [
            [model, w, *(pair(row.get(c)) for c in ours)]
            for model, by_w in an["ours_over_peer"].items()
            for w, row in by_w.items()
        ]
        lines += ["", "Ours / peer samples/s at the same W (ratio of medians; paired in brackets)."]
        lines += ["", *h.table(["model", "W", *ours], vs_peer, "lr")]
    if a["epochs"]:
        lines += epoch_markdown(report)
    goals = [
        [g["goal"], g["contender"], h.fmt(g["value"], ".4g"), "yes" if g["met"] else "NO"]
        for g in an["goals"]
    ]
    reference = ", ".join(f"{m} W=2 {s}x" for m, s in PEER_REFERENCE.items())
    lines += ["", "Goals (from the issue):", ""]
    lines += h.table(["goal", "contender", "value", "met"], goals, "llrl")
    lines += ["", f"The issue author's own peer-style measurement at batch 16: {reference}.", ""]
    return "\n".join(lines)


def epoch_markdown(report: dict) -> list[str]:
    a, med = report["args"], report["analysis"]["epochs"]

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    rows = [
        [m, w, c, h.fmt(f["samples_per_s_eval"], ".0f"), h.fmt(f["run_s"], ".1f"),
         h.fmt(f["launch_s"], ".2f"), pct(f["main_cpu_frac"]), pct(f["stale15"])]
        for m, by_w in med.items() for w, row in by_w.items() for c, f in row.items()
    ]  # fmt: skip
    over = [
        [c, h.fmt(o["ours"], ".3f"), h.fmt(o["bare"], ".3f"), h.fmt(o["bare-fixed"], ".3f"),
         h.fmt(o["overhead_vs_bare_ms"], "+.3f"), h.fmt(o["overhead_vs_bare-fixed_ms"], "+.3f")]
        for c, o in report["step_overhead"].items() if o
    ]  # fmt: skip
    floor, every = report["launch_floor_s"], a["eval_every"] or a["epochs"]
    head = ["model", "W", "rule", "samples/s with evals", "run s", "launch s", "main CPU"]
    head2 = ["rule", "ours ms", "bare ms", "bare, fixed batches ms", "ours - bare"]
    return [
        "",
        f"With the evaluations ({a['epochs']:g} epochs, one every {every:g}):"
        " samples/s over the first step to the end of the final evaluation (`run_s`); launch to"
        " first step (`launch_s`, from the process's creation); the main process's CPU seconds"
        " over the training time (W = 1 has none: its one process steps); updates with"
        " staleness >= 15. Medians over the repeats.",
        "",
        *h.table([*head, "staleness >= 15"], rows, "lrlrrrrr"),
        "",
        f'Launch floor: `python -c "import torch"` takes {floor["median"]} s (median of '
        f"{len(floor['all'])}): no launch of a PyTorch program can reach its first step sooner.",
        "",
        "Milliseconds per step in one process, one thread (`step_overhead.py`: interleaved chunks,"
        " medians): ours (a worker's `Stepper.step` on the shared buffer), a bare PyTorch step"
        " (`torch.optim.SGD`, the batch gathered by the same dataset code), and the same on"
        " batches gathered beforehand; overheads are medians of paired differences.",
        "",
        *h.table([*head2, "ours - bare fixed"], over, "lrrrrr"),
    ]


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = h.new_report("shm_scaling", argv, args)
    cs = list(args.contenders)
    with tempfile.TemporaryDirectory(prefix="shm_scaling-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir, note, verify = h.mnist_data(args.data_dir, tmp, copies=4)
        if "resnet20" in args.models:
            note += "; resnet20: the 3x32x32 synthetic dataset"
        cases = {m: make_case(args, m, data_dir, verify) for m in args.models}
        raw, disturbed = h.sweep(
            args, cs, lambda m, w, c: run_one(args, cases[m], w, c, tmp),
            lambda res: f"{res['samples_per_s']:.0f} samples/s (run {res['wall_s']} s)",
        )  # fmt: skip
        if args.epochs:
            report["launch_floor_s"] = launch_floor(args.repeats)
            report["step_overhead"] = step_overheads(args, data_dir, [c for c in cs if c in RULES])
    results = {
        m: {w: {c: summarise(v) for c, v in row.items()} for w, row in by_w.items()}
        for m, by_w in raw.items()
    }
    report["data"] = note
    report["threads"] = {str(w): args.threads or max(1, h.cores() // w) for w in args.workers}
    report["steps"] = {m: c["steps"] for m, c in cases.items()}
    report["results"] = results
    report["analysis"] = analyse(results, cs)
    if args.epochs:
        med, goals = epoch_figures(results, report["step_overhead"])
        report["analysis"]["epochs"], report["analysis"]["goals"] = med, goals
    report["disturbance"] = disturbed
    h.write_report(report, markdown, args.stem)
    return 0


SITECUSTOMIZE = """
import os
if os.environ.get("SHM_SCALING_PROFILE_DIR"):
    import cProfile, multiprocessing.process as _mp_process
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
        data_dir, _, verify = h.mnist_data(args.data_dir, tmp, copies=4)
        case = make_case(args, model, data_dir, verify)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp / "prof").mkdir()
        path = [str(tmp / "site"), str(h.ROOT), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        env["SHM_SCALING_PROFILE_DIR"] = str(tmp / "prof")
        h.run_child(ours_cmd(args, case, w, rule, tmp / "ours"), args.run_timeout, env)
        s = json.loads((tmp / "ours" / "summary.json").read_text())
        print(f"ours ({rule}, {model}, W={w}): {s['samples_per_s']} samples/s over "
              f"{max(s['train_s'])} s; cProfile of worker 0 (includes start-up):")  # fmt: skip
        profs = sorted((tmp / "prof").glob("hpc-asgd-w0-*.prof"))
        if profs:
            pstats.Stats(str(profs[0])).sort_stats("tottime").print_stats(args.profile_top)
        else:
            print("  (no worker profile: W = 1 runs in the rank's own process)")
        stdout = h.run_child(peer_cmd(args, case, w, profile=True), args.run_timeout)
        print(f"peer ({model}, W={w}), cProfile of worker 0 (timed loop only):\n{stdout}")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--contenders", nargs="+", choices=CONTENDERS, default=["hogwild", "leashed", "peer"],
        help="'all' is not a choice: list them (hogwild leashed locked partitioned peer)",
    )  # fmt: skip
    h.options(
        p,
        ("--repeats", 3),
        ("--batch-size", 16),
        ("--lr", 0.01),
        ("--momentum", 0.5),
        (
            "--steps-scale",
            1.0,
            "multiply every model's step count (mlp 3000, cnn 200, resnet20 64)",
        ),
        ("--threads", 1, "torch threads per process (default 1); 0 = cores // W, at least 1"),
        ("--data-dir", None, "real MNIST IDX files (default: digits)"),
        ("--synthetic-size", 0, argparse.SUPPRESS),
        h.OUT,
        ("--run-timeout", 300.0),
        *h.GUARD,
    )
    p.add_argument(
        "--profile", choices=RULES, default=None,
        help="profile one case of ours (first --models, first --workers) and the peer",
    )  # fmt: skip
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument(
        "--epochs",
        type=float,
        default=0.0,
        help="train this many epochs (instead of the models' step counts) and add "
        "the figures with evaluations, launch, staleness and step overhead",
    )
    p.add_argument(
        "--eval-every",
        type=float,
        default=0.0,
        help="epochs between evaluations (default: only at the end)",
    )
    p.add_argument("--stem", default="shm_scaling", help="output file names")  # fmt: skip
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.workers) < 1 or args.batch_size < 1:
        p.error("--repeats, --workers and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    return profile(args) if args.profile else driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
