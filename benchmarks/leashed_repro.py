"""Leashed-SGD's setting (Bäckström et al., IPDPS 2021): time to a target loss, staleness, CAS.

The paper trains an MLP (3 hidden layers of 128) and a CNN (the PyTorch MNIST example's) on
MNIST with W threads sharing one model, and compares Leashed-SGD (lock-free, consistent)
with lock-based asynchronous SGD and HOGWILD!: it reports Leashed-SGD reaching a given loss
20-80% (up to 4x) sooner than the lock-based baseline, and more stably than HOGWILD!.

Here each (model, W, rule) is one ``python -m hpc_asgd.cli train`` run (W spawned workers
sharing the model; W = 1 runs in the rank's own process) on MNIST-format data: real MNIST
from ``--data-dir``, else scikit-learn's digits upscaled to 28x28 and written as IDX files
(``shm_scaling.write_mnist_like``). Every run uses the same seed, batch, step size and
number of epochs, and evaluates every ``--eval-every`` epochs. From the outputs:

- the loss curve: ``metrics.jsonl``'s ``train_loss`` (the mean minibatch loss of the steps
  since the previous evaluation; a row whose interval saw no step reports 0.0 and is left
  out) against the training clock. The training clock of a row is
  ``train_s * step / total_steps`` (``train_s`` from ``summary.json``: from the moment every
  worker is ready to the last step, with evaluations not counted at W = 1 and overlapping
  the workers at W > 1), so worker start-up is left out alike for every W;
- time to target: the first crossing of ``--target`` by that curve smoothed over ``--smooth``
  evaluations (a trailing mean), interpolated linearly between two evaluations (``null`` if
  never reached);
- final loss (the last interval's mean training loss), final test loss and accuracy, and
  the spread of the training loss over the last quarter of the run (stability);
- the staleness distribution (updates by other workers between a worker's read and its
  write), the CAS-tries distribution (leashed) and the time spent waiting for the lock
  (locked), from ``summary.json["workers"]``.

A repeat runs every rule once per (model, W), in an order rotated each repeat; with
``--repeats`` > 1 the figures are medians. Outputs: ``<out>/leashed_repro.json`` (every row
of every run, command, versions, host), ``<out>/leashed_repro.md`` (tables) and
``<out>/leashed_repro.png`` (loss vs time per rule and W; staleness and CAS-tries
histograms).
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
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (ROOT, HERE):  # run from a checkout without installing; shm_scaling's helpers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _common import load_average, versions  # noqa: E402
from shm_scaling import (  # noqa: E402
    add_guard_args,
    disturbance,
    disturbance_line,
    guarded,
    run_child,
    write_mnist_like,
)

RULES = ("hogwild", "locked", "leashed")
# Per model: epochs and the target training loss (digits-28 defaults; see the README).
DEFAULTS = {"mlp": {"epochs": 6.0, "target": 0.15}, "cnn": {"epochs": 2.0, "target": 0.45}}


def run_cmd(args, model: str, workers: int, rule: str, data_dir: str, out: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "hpc_asgd.cli",
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        data_dir,
        "--model",
        model,
        "--workers",
        str(workers),
        "--update",
        rule,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs[model]),
        "--eval-every",
        str(args.eval_every),
        "--lr",
        str(args.lr),
        "--momentum",
        str(args.momentum),
        "--persistence",
        str(args.persistence),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
    ]
    if args.threads:
        cmd += ["--threads-per-worker", str(args.threads)]
    return cmd


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve ``[(t, loss)]`` reaches ``target``, interpolated linearly."""
    prev = None
    for t, loss in points:
        if math.isfinite(loss) and loss <= target:
            if prev is None or not math.isfinite(prev[1]):
                return t
            t0, l0 = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss) if l0 != loss else t
        prev = (t, loss)
    return None


def hist_mean(hist: list[int], offset: int = 0) -> float | None:
    n = sum(hist)
    return sum((i + offset) * c for i, c in enumerate(hist)) / n if n else None


def smooth(curve: list[tuple], n: int) -> list[tuple[float, float]]:
    """``(t, loss)`` with loss the trailing mean of the last ``n`` evaluations' losses."""
    out = []
    for i, c in enumerate(curve):
        window = [x[1] for x in curve[max(0, i - n + 1) : i + 1]]
        out.append((c[0], sum(window) / len(window)))
    return out


def analyse_run(
    summary: dict, rows: list[dict], target: float, batch: int, smooth_n: int = 1
) -> dict:
    total = summary["steps_per_rank"]
    train_s = max(summary["train_s"])  # per rank; these runs have one
    curve = []
    for r in rows:
        if r["train_loss"] == 0.0:  # no step finished since the previous evaluation (W > 1)
            continue
        step = r["samples"] / batch
        curve.append((round(train_s * step / total, 4), r["train_loss"], r["test_loss"]))
    losses = [c[1] for c in curve]
    finite = [x for x in losses if math.isfinite(x)]  # a diverged run ends in inf / nan
    tail = [x for x in losses[len(losses) - max(2, len(losses) // 4) :] if math.isfinite(x)]
    w = summary["workers"]
    out = {
        "train_s": train_s,
        "wall_s": summary["wall_s"],
        "samples_per_s": summary["samples_per_s"],
        "steps": total,
        "worker_steps": w["steps"][0],
        "t_target_s": crossing(smooth(curve, smooth_n), target),
        "final_train_loss": losses[-1] if math.isfinite(losses[-1]) else None,
        "min_train_loss": min(finite) if finite else None,
        "tail_loss_std": statistics.pstdev(tail) if len(tail) > 1 else None,
        "diverged": len(finite) < len(losses) or losses[-1] > losses[0],
        "final_test_loss": summary["final_test_loss"],
        "final_test_acc": summary["final_test_acc"],
        "applied": w["applied"],
        "dropped": w["dropped"],
        "staleness_hist": w["staleness_hist"],
        "staleness_mean": hist_mean(w["staleness_hist"]),
        "curve": curve,  # (training-clock s, train_loss, test_loss) per evaluation
        "metrics_rows": rows,
    }
    if "cas_tries_hist" in w:
        out["cas_tries_hist"] = w["cas_tries_hist"]
        out["cas_tries_mean"] = hist_mean(w["cas_tries_hist"], offset=1)
    if "lock_wait_s" in w:
        out["lock_wait_s"] = sum(w["lock_wait_s"][0])
        busy = train_s * summary["workers_per_rank"]
        out["lock_wait_frac"] = out["lock_wait_s"] / busy if busy else None
    return out


def run_one(args, model: str, workers: int, rule: str, data_dir: str, tmp: Path) -> dict:
    out = tmp / f"{model}-{workers}-{rule}"
    cmd = run_cmd(args, model, workers, rule, data_dir, out)

    def once() -> dict:
        t0 = time.monotonic()
        run_child(cmd, args.run_timeout)
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
        res = analyse_run(summary, rows, args.target[model], args.batch_size, args.smooth)
        res["run_s"] = round(time.monotonic() - t0, 2)
        return res

    return guarded(once, args, f"{model} W={workers} {rule}")


def median_or_none(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals)


def combine(reps: list[dict]) -> dict:
    """Medians over repeats of the scalar figures; histograms summed; curves kept per repeat."""
    keys = (
        "train_s",
        "samples_per_s",
        "t_target_s",
        "final_train_loss",
        "min_train_loss",
        "tail_loss_std",
        "final_test_loss",
        "final_test_acc",
        "staleness_mean",
        "cas_tries_mean",
        "lock_wait_s",
        "lock_wait_frac",
    )
    out: dict = {}
    for k in keys:
        if k in reps[0]:
            out[k] = median_or_none([r.get(k) for r in reps])
    reached = sum(r["t_target_s"] is not None for r in reps)
    out["reached"] = f"{reached}/{len(reps)}"
    if reached < len(reps) / 2:  # the median run did not reach the target
        out["t_target_s"] = None
    out["diverged"] = sum(r["diverged"] for r in reps)
    for k in ("staleness_hist", "cas_tries_hist"):
        if k in reps[0]:
            out[k] = [sum(col) for col in zip(*(r[k] for r in reps), strict=True)]
    out["dropped"] = sum(r["dropped"] for r in reps)
    out["repeats"] = reps
    return out


def strict_json(v):
    """``v`` with every inf / nan (a diverged run's losses) as None: standard JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [strict_json(x) for x in v]
    return v


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def comparisons(results: dict) -> dict:
    """Per (model, W): locked / leashed and hogwild / leashed time to target (> 1: leashed
    sooner), and hogwild / leashed tail spread (> 1: leashed steadier)."""
    out: dict = {}
    for model, by_w in results.items():
        out[model] = {}
        for w, row in by_w.items():
            le = row.get("leashed")
            if not le:
                continue
            c = {}
            for other in ("locked", "hogwild"):
                o = row.get(other)
                if o and o["t_target_s"] and le["t_target_s"]:
                    c[f"{other}/leashed time to target"] = o["t_target_s"] / le["t_target_s"]
            ho = row.get("hogwild")
            if ho and ho["tail_loss_std"] is not None and le["tail_loss_std"]:
                c["hogwild/leashed tail spread"] = ho["tail_loss_std"] / le["tail_loss_std"]
            out[model][w] = c
    return out


def markdown(report: dict) -> str:
    v, a = report["versions"], report["args"]
    lines = [
        "# Leashed-SGD reproduction: time to a target loss, staleness and CAS tries",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Host `{report['hostname']}`, {report['nproc']} cores, {report['date']}; torch "
        f"{v['torch']}, Python {v['python']}; load average before {report['load_before']}, "
        f"after {report['load_after']}; wall time {report['wall_s']} s.",
        "",
        f"Data: {report['data']}. Batch {a['batch_size']}, step size {a['lr']}, momentum "
        f"{a['momentum']}, persistence bound {a['persistence'] or 'unbounded'}, seed "
        f"{a['seed']}; epochs {a['epochs']}; evaluation every {a['eval_every']} epochs; "
        f"repeats {a['repeats']} (medians). Targets (training loss): {a['target']}.",
        "",
        disturbance_line(report),
        "",
        f"Time to target: the first crossing of the target by the trailing mean of "
        f"{a['smooth']} evaluations, on the training clock (worker start-up excluded; see the "
        "README); '-' = not reached. Tail spread: standard deviation of the interval training loss "
        "over the last quarter of the evaluations.",
        "",
        "| model | W | rule | samples/s | train s | time to target s | final train loss | "
        "tail spread | test acc | mean staleness | mean CAS tries | lock wait |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, by_w in report["results"].items():
        for w, row in by_w.items():
            for rule in a["rules"]:
                r = row.get(rule)
                if not r:
                    continue
                wait = (
                    f"{r['lock_wait_s']:.2f} s ({100 * r['lock_wait_frac']:.0f}%)"
                    if r.get("lock_wait_s") is not None and r.get("lock_wait_frac") is not None
                    else "-"
                )
                lines.append(
                    f"| {model} | {w} | {rule} | {fmt(r['samples_per_s'], '.0f')} | "
                    f"{fmt(r['train_s'], '.1f')} | {fmt(r['t_target_s'], '.2f')} | "
                    f"{fmt(r['final_train_loss'], '.3f')} | {fmt(r['tail_loss_std'], '.3f')} | "
                    f"{fmt(r['final_test_acc'], '.3f')} | {fmt(r['staleness_mean'], '.2f')} | "
                    f"{fmt(r.get('cas_tries_mean'), '.2f')} | {wait} |"
                )
    lines += [
        "",
        "Ratios: > 1 means Leashed-SGD reached the target sooner (time) or had a steadier "
        "tail (spread).",
        "",
        "| model | W | locked / leashed time | hogwild / leashed time | hogwild / leashed spread |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, by_w in report["comparisons"].items():
        for w, c in by_w.items():
            lines.append(
                f"| {model} | {w} | {fmt(c.get('locked/leashed time to target'))} | "
                f"{fmt(c.get('hogwild/leashed time to target'))} | "
                f"{fmt(c.get('hogwild/leashed tail spread'))} |"
            )
    lines += ["", "Staleness histograms (bins 0..14, >=15), summed over repeats:", ""]
    for model, by_w in report["results"].items():
        for w, row in by_w.items():
            for rule in a["rules"]:
                if rule in row and int(w) > 1:
                    h = row[rule]["staleness_hist"]
                    lines.append(f"- {model} W={w} {rule}: {h}")
    lines += ["", "CAS-tries histograms of leashed (bins 1..15, >=16):", ""]
    for model, by_w in report["results"].items():
        for w, row in by_w.items():
            if "leashed" in row and "cas_tries_hist" in row["leashed"]:
                lines.append(f"- {model} W={w}: {row['leashed']['cas_tries_hist']}")
    lines += ["", f"Plot: `{report['plot']}`.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Per model two rows: loss vs training time, one panel per W (rules in colour); then the
    staleness histograms at the largest W, mean staleness vs W, and Leashed-SGD's CAS tries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = report["args"]
    models = list(report["results"])
    colors = {"hogwild": "tab:orange", "locked": "tab:blue", "leashed": "tab:green"}
    ncols = max(3, *(len(by_w) for by_w in report["results"].values()))
    fig, axes = plt.subplots(
        2 * len(models), ncols, figsize=(4.2 * ncols, 3.6 * 2 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        by_w = report["results"][model]
        ws = list(by_w)
        top, bottom = axes[2 * i], axes[2 * i + 1]
        for j, w in enumerate(ws):
            ax = top[j]
            for rule in a["rules"]:
                if rule not in by_w[w]:
                    continue
                curve = smooth(by_w[w][rule]["repeats"][0]["curve"], a["smooth"])
                ax.plot(
                    [c[0] for c in curve],
                    [c[1] for c in curve],
                    color=colors.get(rule),
                    label=rule,
                    lw=1.3,
                    marker=".",
                    ms=3,
                )
            ax.axhline(a["target"][model], color="grey", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel("training time (s)")
            ax.set_ylabel("training loss")
            ax.set_title(f"{model}, W={w}")
            ax.legend(fontsize=8)
        for ax in top[len(ws) :]:
            ax.axis("off")
        big = ws[-1]
        ax = bottom[0]
        width = 0.8 / max(1, len(a["rules"]))
        for k, rule in enumerate(a["rules"]):
            if rule not in by_w[big]:
                continue
            h = by_w[big][rule]["staleness_hist"]
            n = max(1, sum(h))
            ax.bar(
                [x + k * width for x in range(len(h))],
                [c / n for c in h],
                width,
                color=colors.get(rule),
                label=rule,
            )
        ax.set_xlabel("staleness (updates in between; last bin >= 15)")
        ax.set_ylabel("fraction of steps")
        ax.set_title(f"{model}: staleness at W={big}")
        ax.legend(fontsize=8)
        ax = bottom[1]
        for rule in a["rules"]:
            pts = [(int(w), by_w[w][rule]["staleness_mean"]) for w in ws if rule in by_w[w]]
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], "o-", color=colors.get(rule), label=rule
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("W")
        ax.set_ylabel("mean staleness (>= 15 as 15)")
        ax.set_title(f"{model}: mean staleness vs W")
        ax.legend(fontsize=8)
        ax = bottom[2]
        lw = [w for w in ws if "leashed" in by_w[w] and int(w) > 1]
        width = 0.8 / max(1, len(lw))
        for k, w in enumerate(lw):
            h = by_w[w]["leashed"]["cas_tries_hist"]
            n = max(1, sum(h))
            ax.bar(
                [1 + x + k * width for x in range(len(h))],
                [c / n for c in h],
                width,
                label=f"W={w}",
            )
        ax.set_yscale("log")
        ax.set_xlabel("CAS tries per step (last bin >= 16)")
        ax.set_ylabel("fraction of steps")
        ax.set_title(f"{model}: Leashed-SGD CAS tries")
        if lw:
            ax.legend(fontsize=8)
        for ax in bottom[3:]:
            ax.axis("off")
    fig.suptitle(
        f"Leashed-SGD reproduction on {report['hostname']} ({report['nproc']} cores); loss: "
        f"trailing mean of {a['smooth']} evaluations; dotted: target"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    command = shlex.join(["python", "benchmarks/leashed_repro.py", *argv])
    print(f"leashed_repro benchmark: {command}", flush=True)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="leashed_repro-") as tmp_name:
        tmp = Path(tmp_name)
        if args.data_dir:
            data_dir, data_note = args.data_dir, f"MNIST from {args.data_dir}"
        else:
            data_dir = str(tmp / "mnist-like")
            info = write_mnist_like(Path(data_dir), copies=args.copies)
            data_note = (
                f"{info['source']}, {info['train']} training and {info['test']} test "
                "images written as MNIST IDX files"
            )
        raw: dict = {
            m: {str(w): {r: [] for r in args.rules} for w in args.workers} for m in args.models
        }
        for rep in range(args.repeats):
            for model in args.models:
                for w in args.workers:
                    k = (rep + w) % len(args.rules)
                    for rule in args.rules[k:] + args.rules[:k]:
                        res = run_one(args, model, w, rule, data_dir, tmp)
                        raw[model][str(w)][rule].append(res)
                        print(
                            f"  repeat {rep + 1}/{args.repeats} {model} W={w} {rule}: "
                            f"{res['samples_per_s']:.0f} samples/s, target "
                            f"{fmt(res['t_target_s'], '.2f', 'not reached')} s, final loss "
                            f"{fmt(res['final_train_loss'], '.3f', 'diverged')} "
                            f"(run {res['run_s']} s)",
                            flush=True,
                        )
    results = {
        m: {w: {r: combine(v) for r, v in row.items()} for w, row in by_w.items()}
        for m, by_w in raw.items()
    }
    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "leashed_repro",
        "command": command,
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_average(),
        "versions": versions(),
        "data": data_note,
        "results": results,
        "comparisons": comparisons(results),
        "disturbance": disturbance(raw),
        "plot": str(out_dir / "leashed_repro.png"),
        "wall_s": round(time.monotonic() - started, 1),
    }
    plot(report, out_dir / "leashed_repro.png")
    text = json.dumps(strict_json(report), indent=2, allow_nan=False)
    (out_dir / "leashed_repro.json").write_text(text + "\n")
    md = markdown(report)
    (out_dir / "leashed_repro.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'leashed_repro.json'}, .md and .png")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--data-dir", default=None, help="real MNIST IDX files (default: digits upscaled to 28x28)"
    )
    p.add_argument(
        "--copies",
        type=int,
        default=8,
        help="digits data: shifted copies of the 1,437 training digits",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--persistence", type=int, default=0, help="Leashed-SGD B; 0 = unbounded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=float, default=0.1, help="epochs between evaluations")
    p.add_argument(
        "--smooth",
        type=int,
        default=3,
        help="time to target: first crossing of the trailing mean of this many evaluations",
    )
    for model, d in DEFAULTS.items():
        p.add_argument(f"--epochs-{model}", type=float, default=d["epochs"])
        p.add_argument(
            f"--target-{model}",
            type=float,
            default=d["target"],
            help=f"target training loss of {model}",
        )
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores/W)")
    p.add_argument("--out", default="benchmarks/results", help="relative to the repository")
    p.add_argument("--run-timeout", type=float, default=600.0)
    add_guard_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.workers) < 1:
        p.error("--repeats and --workers must be positive")
    args.epochs = {m: getattr(args, f"epochs_{m}") for m in DEFAULTS}
    args.target = {m: getattr(args, f"target_{m}") for m in DEFAULTS}
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return driver(parse(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
