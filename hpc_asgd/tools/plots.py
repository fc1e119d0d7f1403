"""The report's figures (matplotlib, Agg): ``curves.png``, ``ranks.png``, ``workers.png`` and
``scaling.png`` of :func:`hpc_asgd.tools.report.write_report` (its docstring says what each
shows). Each returns its figure, or None when the runs have nothing to draw."""

from __future__ import annotations

import statistics

from hpc_asgd.tools.report import INSTALL, ReportError, Run, as_float, rank_figures


def plt_module():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(INSTALL) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _titled(fig, title: str):
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _tex(label: str) -> str:
    """A label as matplotlib draws it literally (a pair of ``$`` would start mathtext)."""
    return label.replace("$", r"\$")


def _offset(i: int, n: int) -> float:
    """Where run ``i`` of ``n`` puts its bar in a group of bars 0.8 wide."""
    return (i - (n - 1) / 2) * 0.8 / n


def curves(plt, runs: list[Run]):
    with_rows = [r for r in runs if r.rows]
    if not with_rows:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    from matplotlib.ticker import EngFormatter, ScalarFormatter

    losses = []
    for run in with_rows:
        t = [as_float(row["time_s"]) for row in run.rows]
        n = [as_float(row["samples"]) for row in run.rows]
        acc = [100 * as_float(row["test_acc"]) for row in run.rows]
        loss = [as_float(row["train_loss"]) for row in run.rows]
        losses += [x for x in loss if x > 0]
        for ax, x, y in ((axes[0, 0], t, acc), (axes[0, 1], n, acc),
                         (axes[1, 0], t, loss), (axes[1, 1], n, loss)):  # fmt: skip
            ax.plot(x, y, marker="." if len(x) < 40 else None, label=_tex(run.label))
    for ax in axes[0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[1]:
        ax.set_ylabel("training loss (mean since the last evaluation)")
        if losses and max(losses) > 10 * min(losses):  # a log scale only over a decade
            ax.set_yscale("log")
    for ax in axes[:, 0]:
        ax.set_xlabel("wall time since the start of the run (s)")
    for ax in axes[:, 1]:
        ax.set_xlabel("samples, all ranks")
        ax.xaxis.set_major_formatter(EngFormatter())
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if isinstance(ax.yaxis.get_major_formatter(), ScalarFormatter):
            ax.ticklabel_format(axis="y", useOffset=False)
    axes[0, 0].legend(fontsize=8)
    return _titled(fig, "Accuracy and loss against time and samples")


def ranks(plt, runs: list[Run]):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        rates, share = rank_figures(run)
        xs = [r + _offset(i, len(runs)) for r in range(len(rates))]
        a.bar(xs, rates, width, label=_tex(run.label))
        b.bar(xs, [100 * x for x in share], width, label=_tex(run.label))
    ranks = max(r.ranks for r in runs)
    from matplotlib.ticker import MaxNLocator

    for ax, what in ((a, "samples/s (its steps x batch / its training time)"),
                     (b, "communication wait (% of its training time)")):  # fmt: skip
        ax.set_xlabel("rank")
        ax.set_ylabel(what)
        if ranks <= 32:
            ax.set_xticks(range(ranks))
        else:  # a tick per rank would be a smear (and slow)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0, top=None if ax.get_ylim()[1] > 0 else 1)
        ax.grid(alpha=0.3, axis="y")
    # headroom above the bars for the legend (it would hide the tallest ones)
    a.set_ylim(top=a.get_ylim()[1] * (1.1 + 0.07 * -(-len(runs) // 2)))
    a.legend(fontsize=7, ncol=2, loc="upper left")
    return _titled(fig, "Per rank")


def workers(plt, runs: list[Run]):
    def hist(run: Run, key: str) -> list:
        return (run.summary.get("workers") or {}).get(key) or []

    runs = [r for r in runs if r.summary.get("worker_processes") and hist(r, "staleness_hist")]
    if not runs:
        return None
    cas = any(hist(r, "cas_tries_hist") for r in runs)
    fig, axes = plt.subplots(1, 2 if cas else 1, figsize=(11 if cas else 6, 4), squeeze=False)
    a, b = axes[0, 0], axes[0, -1]
    keys = ["staleness_hist", "cas_tries_hist"] if cas else ["staleness_hist"]
    bins = max(len(hist(r, key)) for r in runs for key in keys)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        off = _offset(i, len(runs))
        for ax, key in zip((a, b), keys, strict=False):
            counts = hist(run, key)
            if counts:
                total = max(1, sum(counts))
                ax.bar([k + off for k in range(len(counts))],
                       [100 * h / total for h in counts], width, label=_tex(run.label))  # fmt: skip
    a.set_xlabel("staleness: updates by others between a worker's read and its write")
    a.set_xticks(range(bins), [*map(str, range(bins - 1)), f">={bins - 1}"], fontsize=7)
    if cas:
        b.set_xlabel("CAS tries per update (Leashed-SGD)")
        b.set_xticks(range(bins), [*map(str, range(1, bins)), f">={bins}"], fontsize=7)
    for ax in {a, b}:
        ax.set_ylabel("% of updates")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    a.legend(fontsize=8)
    return _titled(fig, "Workers sharing a rank's model")


def scaling_plot(plt, points: list[dict]):
    series: dict[tuple, list[dict]] = {}
    for p in points:
        series.setdefault((*p["run"].key, *p["run"].workload), []).append(p)
    series = {k: v for k, v in series.items() if len({p["units"] for p in v}) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    drawn = False
    for (algo, update, *_), pts in series.items():
        rule = f" {update}" if any(p["run"].workers > 1 for p in pts) else ""
        for by, other in (("ranks", "workers"), ("workers", "ranks")):
            # one line per value of the other dimension; repeats of a point: their median
            fixed: dict[int, dict[int, list[dict]]] = {}
            for p in pts:
                at = fixed.setdefault(getattr(p["run"], other), {})
                at.setdefault(getattr(p["run"], by), []).append(p)
            for held, by_x in sorted(fixed.items()):
                if len(by_x) < 2:
                    continue
                x = sorted(by_x)
                name = f"{algo}{rule}, " + (f"W={held}" if by == "ranks" else f"{held} ranks")
                style = "o-" if by == "ranks" else "s--"
                for ax, key in zip(axes, ("samples_per_s", "speedup", "efficiency"), strict=True):
                    y = [statistics.median(p[key] for p in by_x[v]) for v in x]
                    ax.plot(x, y, style, label=_tex(name))
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    sizes = sorted({getattr(p["run"], by) for p in points for by in ("ranks", "workers")})
    for ax, what in zip(axes, ("samples/s", "speed-up", "parallel efficiency"), strict=True):
        ax.set_xlabel("ranks (o) or workers per rank W (s)")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    return _titled(fig, "Scaling (speed-up against the smallest ranks x W of each series)")
