"""Samples/s of W shared-memory workers (one rank) against a PyTorch ``mnist_hogwild`` peer.

Contenders, per (model, W), all measured in one invocation of this script:

  hogwild, leashed,      ``python -m hpc_asgd.cli train --update RULE --workers W ...``: the
  locked, partitioned    rank's own process at W = 1, W spawned workers otherwise; the figure is
                         ``summary.json["samples_per_s"]`` (training time only: from the moment
                         every worker is ready to the last step)
  peer                   ``peers/hogwild.py``, in the style of pytorch/examples
                         ``mnist_hogwild``: ``model.share_memory()``, W spawned processes, each
                         with its own ``torch.optim.SGD`` over the shared parameters; timed
                         from a start barrier (all W ready) to the end of the last process

Every contender trains the same model (``build_model``, seed 0) on the same data in the same
batch order (``ShardSampler``, seed 0), the same number of steps of batch ``--batch-size``,
with SGD ``--lr`` / ``--momentum`` (momentum private to each process), and the same torch
threads per process: ``--threads`` (default 1, so that W measures the scaling of W processes,
as the issue's peer figure of 1.92x at W = 2 implies; with ``--threads 0`` each process gets
``cores // W``, so the one process of W = 1 already uses every core through intra-op
parallelism). mlp and cnn run on MNIST-format 1x28x28 data (real MNIST from ``--data-dir``,
else scikit-learn's digits upscaled to 28x28 as IDX files in a temporary folder); resnet20 on
the 3x32x32 synthetic dataset. A repeat runs every contender once per (model, W), in an order
rotated each repeat; every run is a fresh process tree, and a run during which other jobs used
more than ``--max-foreign`` cores is retried (``--retries``), keeping the least disturbed. The
figure is the median over ``--repeats``; ratios are ratios of medians, and ``ours / peer``
also has a paired ratio (the median over repeats of the per-repeat ratio).

Outputs: ``<out>/shm_scaling.json`` (every raw number, medians, ratios, goals, command,
versions, host) and ``<out>/shm_scaling.md`` (tables).

``--profile RULE`` instead runs one case (``--models``/``--workers``, first of each) of our
trainer with cProfile inside every spawned worker (a ``sitecustomize`` written to a temporary
folder on ``PYTHONPATH``, active only in this script's own child processes) and prints the top
functions of worker 0, next to a cProfile of the peer's worker 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    ROOT,
    add_guard_args,
    cores,
    disturbance,
    disturbance_line,
    guarded,
    header,
    mnist_data,
    new_report,
    paired,
    result_line,
    rotated,
    run_child,
    train_cmd,
    write_report,
)
from peers.hogwild import MARK

RULES = ("hogwild", "leashed", "locked", "partitioned")
CONTENDERS = (*RULES, "peer")
# model -> (dataset, steps per run): about 2 s of training at W = 1 on a 2-core machine.
MODELS = {"mlp": ("mnist", 3000), "cnn": ("mnist", 200), "resnet20": ("synthetic", 64)}
GOALS_SPEEDUP = {"cnn": 1.9, "mlp": 1.75}  # W=2 vs W=1, stated by the issue
PEER_REFERENCE = {"cnn": 1.92, "mlp": 1.57}  # the issue author's peer-style W=2 speedups
PEER = str(Path(__file__).resolve().parent / "peers" / "hogwild.py")


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
    return case


def ours_cmd(args, case: dict, workers: int, rule: str, out: Path) -> list[str]:
    # epochs such that ceil(epochs * steps_per_epoch) == steps; evaluate only at the end
    epochs = case["steps"] / (case["n_train"] // args.batch_size)
    return train_cmd({
        "dataset": case["dataset"], "data-dir": case["data_dir"], "no-verify": not case["verify"],
        "model": case["model"], "workers": workers, "update": rule,
        "batch-size": args.batch_size, "epochs": repr(epochs), "eval-every": repr(max(epochs, 1.0)),
        "lr": args.lr, "momentum": args.momentum, "seed": 0, "out": out,
        "synthetic-size": case["synthetic_size"] if case["dataset"] == "synthetic" else None,
        "threads-per-worker": args.threads or None,
    })  # fmt: skip


def peer_cmd(args, case: dict, workers: int, profile: bool = False) -> list[str]:
    opts = {k: case[k] for k in ("dataset", "data_dir", "verify", "synthetic_size", "steps")}
    opts.update(model=case["model"], workers=workers, batch_size=args.batch_size, lr=args.lr)
    opts.update(momentum=args.momentum, threads=args.threads or max(1, cores() // workers))
    return [sys.executable, PEER, json.dumps({**opts, "profile": profile})]


def run_one(args, case: dict, workers: int, contender: str, tmp: Path) -> dict:
    def once() -> dict:
        t0 = time.monotonic()
        if contender == "peer":
            res = result_line(run_child(peer_cmd(args, case, workers), args.run_timeout), MARK)
        else:
            out = tmp / f"{case['model']}-{workers}-{contender}"
            run_child(ours_cmd(args, case, workers, contender, out), args.run_timeout)
            s = json.loads((out / "summary.json").read_text())
            if s["steps_per_rank"] != case["steps"]:
                sys.exit(f"shm_scaling.py: ours ran {s['steps_per_rank']} steps, not {case}")
            res = {
                "samples_per_s": s["samples_per_s"], "train_s": max(s["train_s"]),
                "steps": s["steps_per_rank"], "final_test_acc": s["final_test_acc"],
                "worker_steps": s["workers"]["steps"][0],
            }  # fmt: skip
        res["run_s"] = round(time.monotonic() - t0, 2)
        return res

    return guarded(once, args, f"{case['model']} W={workers} {contender}")


def summarise(reps: list[dict]) -> dict:
    v = [r["samples_per_s"] for r in reps]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": reps}


def rates(entry: dict) -> list[float]:
    return [r["samples_per_s"] for r in entry["repeats"]]


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
                    "paired": paired(rates(row[c]), rates(peer))}
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
    title = "Shared-memory workers: samples/s vs W, ours vs an mnist_hogwild-style peer"
    lines = [
        *header(report, title),
        f"Batch {a['batch_size']}, lr {a['lr']}, momentum {a['momentum']}; torch threads per "
        f"process: {report['threads']}. Data: {report['data']}.",
        "",
        disturbance_line(report),
        "",
        f"Samples/s (training only), median over {a['repeats']} repeats, [min-max] below each.",
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
            lines.append(f"| {model} | {report['steps'][model]} | {w} | {' | '.join(cells)} |")
    lines += ["", "Speedup over W=1 of the same contender (ratio of medians).", ""]
    lines += ["| model | W | " + " | ".join(cs) + " |", "|---|---:|" + "---:|" * len(cs)]
    for model, by_c in an["speedup"].items():
        for w in sorted({w for d in by_c.values() for w in d}, key=int):
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
        for model, by_w in an["ours_over_peer"].items():
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
    for g in an["goals"]:
        met = "yes" if g["met"] else "NO"
        lines.append(f"| {g['goal']} | {g['contender']} | {g['value']:.2f} | {met} |")
    reference = ", ".join(f"{m} W=2 {s}x" for m, s in PEER_REFERENCE.items())
    lines += ["", f"The issue author's own peer-style measurement at batch 16: {reference}.", ""]
    return "\n".join(lines)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = new_report("shm_scaling", argv, args)
    cs = list(args.contenders)
    with tempfile.TemporaryDirectory(prefix="shm_scaling-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir, note, verify = mnist_data(args.data_dir, tmp, copies=4)
        if "resnet20" in args.models:
            note += "; resnet20: the 3x32x32 synthetic dataset"
        cases = {m: make_case(args, m, data_dir, verify) for m in args.models}
        raw = {m: {str(w): {c: [] for c in cs} for w in args.workers} for m in args.models}
        for r in range(args.repeats):
            for model in args.models:
                for w in args.workers:
                    for c in rotated(cs, r + w):
                        res = run_one(args, cases[model], w, c, tmp)
                        raw[model][str(w)][c].append(res)
                        print(f"  repeat {r + 1}/{args.repeats} {model} W={w} {c}: "
                              f"{res['samples_per_s']:.0f} samples/s (run {res['run_s']} s)",
                              flush=True)  # fmt: skip
    results = {
        m: {w: {c: summarise(v) for c, v in row.items()} for w, row in by_w.items()}
        for m, by_w in raw.items()
    }
    report["data"] = note
    report["threads"] = {str(w): args.threads or max(1, cores() // w) for w in args.workers}
    report["steps"] = {m: c["steps"] for m, c in cases.items()}
    report["results"] = results
    report["analysis"] = analyse(results, cs)
    runs = [r for by_w in raw.values() for row in by_w.values() for v in row.values() for r in v]
    report["disturbance"] = disturbance(runs)
    write_report(report, markdown, "shm_scaling")
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
        data_dir, _, verify = mnist_data(args.data_dir, tmp, copies=4)
        case = make_case(args, model, data_dir, verify)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp / "prof").mkdir()
        path = [str(tmp / "site"), str(ROOT), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        env["SHM_SCALING_PROFILE_DIR"] = str(tmp / "prof")
        run_child(ours_cmd(args, case, w, rule, tmp / "ours"), args.run_timeout, env)
        s = json.loads((tmp / "ours" / "summary.json").read_text())
        print(f"ours ({rule}, {model}, W={w}): {s['samples_per_s']} samples/s over "
              f"{max(s['train_s'])} s; cProfile of worker 0 (includes start-up):")  # fmt: skip
        profs = sorted((tmp / "prof").glob("hpc-asgd-w0-*.prof"))
        if profs:
            pstats.Stats(str(profs[0])).sort_stats("tottime").print_stats(args.profile_top)
        else:
            print("  (no worker profile: W = 1 runs in the rank's own process)")
        stdout = run_child(peer_cmd(args, case, w, profile=True), args.run_timeout)
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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.5)
    p.add_argument(
        "--steps-scale", type=float, default=1.0,
        help="multiply every model's step count (mlp 3000, cnn 200, resnet20 64)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per process (default 1); 0 = cores // W, at least 1",
    )  # fmt: skip
    p.add_argument("--data-dir", default=None, help="real MNIST IDX files (default: digits)")
    p.add_argument("--synthetic-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results", help="relative to the repository")
    p.add_argument("--run-timeout", type=float, default=300.0)
    add_guard_args(p)
    p.add_argument(
        "--profile", choices=RULES, default=None,
        help="profile one case of ours (first --models, first --workers) and the peer",
    )  # fmt: skip
    p.add_argument("--profile-top", type=int, default=25)
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
