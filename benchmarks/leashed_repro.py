"""Leashed-SGD's setting (Bäckström et al., IPDPS 2021): time to a target loss, staleness, CAS.

Each (model, W, rule) is one ``python -m hpc_asgd.cli train`` run (W workers sharing one
model) on MNIST-format data, at the same seed, batch, step size and epochs. From its
``metrics.jsonl`` and ``summary.json``: the training-loss curve on the training clock, the
time to ``--target`` (first crossing of the smoothed curve), final loss and tail spread, test
accuracy, staleness and CAS-tries histograms, lock wait. Rules run in rotated order per
repeat, disturbed runs retried; medians over repeats. Outputs ``<out>/leashed_repro.json``,
``.md`` and ``.png``; benchmarks/README.md defines each figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as h

RULES = ("hogwild", "locked", "leashed")
# Per model: epochs and the target training loss (digits-28 defaults; see the README).
DEFAULTS = {"mlp": {"epochs": 6.0, "target": 0.15}, "cnn": {"epochs": 2.0, "target": 0.45}}
MEDIANS = ("train_s", "samples_per_s", "t_target_s", "final_train_loss", "min_train_loss",
           "tail_loss_std", "final_test_loss", "final_test_acc", "staleness_mean",
           "cas_tries_mean", "lock_wait_s", "lock_wait_frac")  # fmt: skip
COLORS = {"hogwild": "tab:orange", "locked": "tab:blue", "leashed": "tab:green"}


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


def analyse_run(summary: dict, rows: list[dict], target: float, batch: int, smooth_n: int):
    total, train_s = summary["steps_per_rank"], max(summary["train_s"])  # one rank here
    curve = [  # (training-clock s, train_loss, test_loss) per evaluation that saw steps
        (round(train_s * r["samples"] / batch / total, 4), r["train_loss"], r["test_loss"])
        for r in rows
        if r["train_loss"] != 0.0
    ]
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
        "curve": curve,
        "metrics_rows": rows,
    }
    if "cas_tries_hist" in w:
        out["cas_tries_hist"] = w["cas_tries_hist"]
        out["cas_tries_mean"] = hist_mean(w["cas_tries_hist"], offset=1)
    if "lock_wait_s" in w:
        out["lock_wait_s"] = sum(w["lock_wait_s"][0])
        out["lock_wait_frac"] = h.ratio(out["lock_wait_s"], train_s * summary["workers_per_rank"])
    return out


def run_one(args, model: str, workers: int, rule: str, data: tuple, tmp: Path) -> dict:
    out = tmp / f"{model}-{workers}-{rule}"
    cmd = h.train_cmd({
        "dataset": "mnist", "data-dir": data[0], "no-verify": not data[2], "model": model,
        "workers": workers, "update": rule, "batch-size": args.batch_size,
        "epochs": args.epochs[model], "eval-every": args.eval_every, "lr": args.lr,
        "momentum": args.momentum, "persistence": args.persistence, "seed": args.seed,
        "out": out, "threads-per-worker": args.threads or None,
    })  # fmt: skip

    def once() -> dict:
        t0 = time.monotonic()
        h.run_child(cmd, args.run_timeout)
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
        res = analyse_run(summary, rows, args.target[model], args.batch_size, args.smooth)
        res["run_s"] = round(time.monotonic() - t0, 2)
        return res

    return h.guarded(once, args, f"{model} W={workers} {rule}")


def combine(reps: list[dict]) -> dict:
    """Medians over repeats of the scalar figures; histograms summed; curves kept per repeat."""
    out: dict = {k: h.median([r.get(k) for r in reps]) for k in MEDIANS if k in reps[0]}
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


def comparisons(results: dict) -> dict:
    """Per (model, W): locked / leashed and hogwild / leashed time to target (> 1: leashed
    sooner), and hogwild / leashed tail spread (> 1: leashed steadier)."""
    out: dict = {}
    for model, by_w in results.items():
        out[model] = {}
        for w, row in by_w.items():
            if not (le := row.get("leashed")):
                continue
            c = out[model][w] = {}
            for other, key, name in (
                ("locked", "t_target_s", "locked/leashed time to target"),
                ("hogwild", "t_target_s", "hogwild/leashed time to target"),
                ("hogwild", "tail_loss_std", "hogwild/leashed tail spread"),
            ):
                if (r := h.ratio(row.get(other, {}).get(key), le[key])) is not None:
                    c[name] = r
    return out


COLUMNS = ("model", "W", "rule", "samples/s", "train s", "time to target s", "final train loss",
           "tail spread", "test acc", "mean staleness", "mean CAS tries", "lock wait")  # fmt: skip
# run figure, format (one per column from "samples/s" to "mean CAS tries")
CELLS = (("samples_per_s", ".0f"), ("train_s", ".1f"), ("t_target_s", ".2f"),
         ("final_train_loss", ".3f"), ("tail_loss_std", ".3f"), ("final_test_acc", ".3f"),
         ("staleness_mean", ".2f"), ("cas_tries_mean", ".2f"))  # fmt: skip
RATIOS = ("locked/leashed time to target", "hogwild/leashed time to target",
          "hogwild/leashed tail spread")  # fmt: skip


def markdown(report: dict) -> str:
    a = report["args"]
    every = [(m, w, rule, row[rule]) for m, by_w in report["results"].items()
             for w, row in by_w.items() for rule in a["rules"] if rule in row]  # fmt: skip
    rows = []
    for model, w, rule, r in every:
        wait = "-"
        if r.get("lock_wait_s") is not None and r.get("lock_wait_frac") is not None:
            wait = f"{r['lock_wait_s']:.2f} s ({100 * r['lock_wait_frac']:.0f}%)"
        rows.append([model, w, rule, *(h.fmt(r.get(k), spec) for k, spec in CELLS), wait])
    ratios = [
        [model, w, *(h.fmt(c.get(k)) for k in RATIOS)]
        for model, by_w in report["comparisons"].items()
        for w, c in by_w.items()
    ]
    ratio_head = ["model", "W", "locked / leashed time", "hogwild / leashed time"]
    lines = [
        *h.header(
            report, "Leashed-SGD reproduction: time to a target loss, staleness and CAS tries"
        ),
        f"Data: {report['data']}. Batch {a['batch_size']}, step size {a['lr']}, momentum "
        f"{a['momentum']}, persistence bound {a['persistence'] or 'unbounded'}, seed "
        f"{a['seed']}; epochs {a['epochs']}; evaluation every {a['eval_every']} epochs; "
        f"repeats {a['repeats']} (medians). Targets (training loss): {a['target']}.",
        "",
        h.disturbance_line(report),
        "",
        f"Time to target: the first crossing of the target by the trailing mean of "
        f"{a['smooth']} evaluations, on the training clock (worker start-up excluded; see the "
        "README); '-' = not reached. Tail spread: standard deviation of the interval training loss "
        "over the last quarter of the evaluations.",
        "",
        *h.table(list(COLUMNS), rows, "lrlr"),
        "",
        "Ratios: > 1 means Leashed-SGD reached the target sooner (time) or had a steadier "
        "tail (spread).",
        "",
        *h.table([*ratio_head, "hogwild / leashed spread"], ratios, "lr"),
        "",
        "Staleness histograms (bins 0..14, >=15), summed over repeats:",
        "",
        *(f"- {m} W={w} {rule}: {r['staleness_hist']}" for m, w, rule, r in every if int(w) > 1),
        "",
        "CAS-tries histograms of leashed (bins 1..15, >=16):",
        "",
    ]
    lines += [f"- {m} W={w}: {r['cas_tries_hist']}" for m, w, rule, r in every
              if rule == "leashed" and "cas_tries_hist" in r]  # fmt: skip
    return "\n".join([*lines, "", f"Plot: `{report['plot']}`.", ""])


def bars(ax, hists: dict, first: int, colors: dict) -> None:
    """Side-by-side bars of each histogram as fractions of its total, bins from ``first``."""
    width = 0.8 / max(1, len(hists))
    for k, (label, hist) in enumerate(hists.items()):
        x = [first + i + k * width for i in range(len(hist))]
        ax.bar(
            x, [c / max(1, sum(hist)) for c in hist], width, color=colors.get(label), label=label
        )


def plot(report: dict, path: Path) -> None:
    """Per model two rows: loss vs training time, one panel per W (rules in colour); then the
    staleness histograms at the largest W, mean staleness vs W, and Leashed-SGD's CAS tries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, models = report["args"], list(report["results"])
    ncols = max(3, *(len(by_w) for by_w in report["results"].values()))
    fig, axes = plt.subplots(2 * len(models), ncols, squeeze=False,
                             figsize=(4.2 * ncols, 3.6 * 2 * len(models)))  # fmt: skip
    for i, model in enumerate(models):
        by_w = report["results"][model]
        ws, top, bottom = list(by_w), axes[2 * i], axes[2 * i + 1]
        for ax, w in zip(top, ws, strict=False):
            for rule in (r for r in a["rules"] if r in by_w[w]):
                curve = smooth(by_w[w][rule]["repeats"][0]["curve"], a["smooth"])
                ax.plot(*zip(*curve, strict=True), color=COLORS.get(rule), label=rule, lw=1.3,
                        marker=".", ms=3)  # fmt: skip
            ax.axhline(a["target"][model], color="grey", lw=0.8, ls=":")
            ax.set(yscale="log", xlabel="training time (s)", ylabel="training loss",
                   title=f"{model}, W={w}")  # fmt: skip
        big = ws[-1]
        hists = {r: by_w[big][r]["staleness_hist"] for r in a["rules"] if r in by_w[big]}
        bars(bottom[0], hists, 0, COLORS)
        bottom[0].set(title=f"{model}: staleness at W={big}", ylabel="fraction of steps",
                      xlabel="staleness (updates in between; last bin >= 15)")  # fmt: skip
        for rule in a["rules"]:
            pts = [(int(w), by_w[w][rule]["staleness_mean"]) for w in ws if rule in by_w[w]]
            bottom[1].plot(*zip(*pts, strict=True), "o-", color=COLORS.get(rule), label=rule)
        bottom[1].set_xscale("log", base=2)
        bottom[1].set(xlabel="W", ylabel="mean staleness (>= 15 as 15)",
                      title=f"{model}: mean staleness vs W")  # fmt: skip
        hists = {f"W={w}": by_w[w]["leashed"]["cas_tries_hist"] for w in ws
                 if "leashed" in by_w[w] and int(w) > 1}  # fmt: skip
        bars(bottom[2], hists, 1, {})
        bottom[2].set(yscale="log", xlabel="CAS tries per step (last bin >= 16)",
                      ylabel="fraction of steps")  # fmt: skip
        bottom[2].set_title(f"{model}: Leashed-SGD CAS tries")
        for ax in [*top[: len(ws)], *bottom[:3]]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        for ax in [*top[len(ws) :], *bottom[3:]]:
            ax.axis("off")
    fig.suptitle(
        f"Leashed-SGD reproduction on {report['hostname']} ({report['nproc']} cores); loss: "
        f"trailing mean of {a['smooth']} evaluations; dotted: target"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(res: dict) -> str:
    return (
        f"{res['samples_per_s']:.0f} samples/s, target "
        f"{h.fmt(res['t_target_s'], '.2f', 'not reached')} s, final loss "
        f"{h.fmt(res['final_train_loss'], '.3f', 'diverged')} (run {res['run_s']} s)"
    )


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = h.new_report("leashed_repro", argv, args)
    with tempfile.TemporaryDirectory(prefix="leashed_repro-") as tmp_name:
        tmp = Path(tmp_name)
        data = h.mnist_data(args.data_dir, tmp, copies=args.copies)
        raw, disturbed = h.sweep(
            args, args.rules, lambda m, w, r: run_one(args, m, w, r, data, tmp), show
        )
    report["data"] = data[1]
    report["results"] = {
        m: {w: {r: combine(v) for r, v in row.items()} for w, row in by_w.items()}
        for m, by_w in raw.items()
    }
    report["comparisons"] = comparisons(report["results"])
    report["disturbance"] = disturbed
    report["plot"] = str(h.out_dir(args.out) / "leashed_repro.png")
    plot(report, Path(report["plot"]))
    h.write_report(report, markdown, "leashed_repro")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    h.options(
        p,
        ("--repeats", 1),
        ("--data-dir", None, "real MNIST IDX files (default: digits upscaled to 28x28)"),
        ("--copies", 8, "digits data: shifted copies of the 1,437 training digits"),
        ("--batch-size", 16),
        ("--lr", 0.05),
        ("--momentum", 0.0),
        ("--persistence", 0, "Leashed-SGD B; 0 = unbounded"),
        ("--seed", 0),
        ("--eval-every", 0.1, "epochs between evaluations"),
        ("--smooth", 3, "time to target: first crossing of the mean of this many evaluations"),
    )
    for m, d in DEFAULTS.items():
        h.options(
            p,
            (f"--epochs-{m}", d["epochs"]),
            (f"--target-{m}", d["target"], f"target training loss of {m}"),
        )
    h.options(
        p,
        ("--threads", 0, "torch threads per worker (0: cores/W)"),
        h.OUT,
        ("--run-timeout", 600.0),
        *h.GUARD,
    )
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
