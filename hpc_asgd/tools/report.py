"""``hpc-asgd report RUN_DIR... [--out DIR]``: a Markdown report with PNG plots of finished runs.

A RUN_DIR is a run's ``--out`` folder (``summary.json``, ``metrics.jsonl``) or a folder of such
folders (a scaling study's ``--out-root``). The report overlays the runs, each labelled by
algorithm, update rule, workers per rank W and ranks:

- ``curves.png``: test accuracy and training loss against wall time (``metrics.jsonl``'s
  ``time_s``, from the start of the run) and against samples (all ranks);
- ``ranks.png``: per rank, samples/s (its steps x batch over its training time) and the share
  of its training time spent waiting in communication (``comm_wait_s / train_s``);
- ``workers.png`` (runs with worker processes): staleness and CAS-tries histograms;
- ``scaling.png`` (runs of one algorithm and rule at several sizes): samples/s, speed-up and
  parallel efficiency against the number of ranks and against W (speed-up against the smallest
  ranks x W of the same algorithm and rule, efficiency = speed-up x base units / units).

Only reads JSON (no torch): matplotlib (Agg) comes from the ``plot`` extra.
``scripts/scaling_study.py`` draws its plots through :func:`write_report`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from hpc_asgd.errors import HpcAsgdError

INSTALL = "the report's plots need matplotlib: pip install 'hpc_asgd[plot]'"


class ReportError(HpcAsgdError):
    """A folder that is no run, or an output that cannot be read."""


@dataclass
class Run:
    path: Path
    summary: dict
    rows: list[dict]  # metrics.jsonl
    label: str = ""

    @property
    def workers(self) -> int:
        return int(self.summary.get("workers_per_rank") or 1)

    @property
    def ranks(self) -> int:
        return int(self.summary.get("world_size") or 1)

    @property
    def key(self) -> tuple[str, str]:
        """(algorithm, update rule): with :attr:`workload`, a scaling series (a W = 1 run
        belongs to the series of the rule it was configured with)."""
        return str(self.summary.get("algo")), str(self.summary.get("update"))

    @property
    def workload(self) -> tuple:
        """Runs of another dataset, model or batch size are no points of the same series."""
        s = self.summary
        return (
            s.get("dataset"),
            s.get("model"),
            (s.get("config") or {}).get("batch_size"),
            *(self.delays),
        )

    @property
    def delays(self) -> tuple[str, ...]:
        """The injected delays (a straggler, random delays, a pause): another condition."""
        c = self.summary.get("config") or {}
        out = []
        if (c.get("slow_rank", -1) >= 0) and (c.get("slow_factor") or 1) != 1:
            out.append(f"rank {c['slow_rank']} x{c['slow_factor']:g}")
        if c.get("delay"):
            out.append(f"delay {c['delay']}")
        if (c.get("pause_rank", -1) >= 0) and c.get("pause_at"):
            out.append(f"rank {c['pause_rank']} pauses {c.get('pause_s', 0):g} s")
        return tuple(out)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return value


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return rows


def load_runs(folders: list[Path]) -> list[Run]:
    """The runs in ``folders`` (each a run folder or a folder of run folders), labelled."""
    runs = []
    for folder in folders:
        if (folder / "summary.json").is_file():
            found = [folder]
        else:
            found = sorted(p.parent for p in folder.glob("*/summary.json"))
            if not found:
                what = "no such folder" if not folder.is_dir() else "no summary.json in it"
                raise ReportError(
                    f"{folder}: {what} (a run's --out folder, or a folder of them, expected)"
                )
        for path in found:
            summary = _read_json(path / "summary.json")
            if "samples_per_s" not in summary or "algo" not in summary:
                raise ReportError(f"{path / 'summary.json'}: not an hpc-asgd summary")
            runs.append(Run(path, summary, _read_rows(path / "metrics.jsonl")))
    for run in runs:
        algo, update = run.key
        run.label = f"{algo}" + (f" {update} W={run.workers}" if run.workers > 1 else "")
        run.label += f", {run.ranks} rank{'s' if run.ranks > 1 else ''}"
        run.label += "".join(f", {d}" for d in run.delays)
    labels = [r.label for r in runs]
    for run in runs:  # the same configuration twice: name the folder too
        if labels.count(run.label) > 1:
            run.label += f" ({run.path.name})"
    return runs


def rank_figures(run: Run) -> tuple[list[float], list[float]]:
    """Per rank: samples/s over its own training time, and its communication-wait share."""
    s = run.summary
    batch = s.get("config", {}).get("batch_size") or 0
    train = s.get("train_s") or []
    taken = s.get("steps_taken") or [s.get("steps_per_rank", 0)] * len(train)
    wait = s.get("comm_wait_s") or [0.0] * len(train)
    rates = [n * batch / t if t else math.nan for n, t in zip(taken, train, strict=False)]
    share = [w / t if t else math.nan for w, t in zip(wait, train, strict=False)]
    return rates, share


def scaling(runs: list[Run]) -> list[dict]:
    """Speed-up and efficiency per run against the smallest ranks x W of its series."""
    out = []
    for run in runs:
        series = [
            r for r in runs
            if (r.key, r.workload) == (run.key, run.workload) and r.summary.get("samples_per_s")
        ]  # fmt: skip
        rate = run.summary.get("samples_per_s")
        if not rate or not series:
            continue
        base = min(series, key=lambda r: r.ranks * r.workers)
        units, base_units = run.ranks * run.workers, base.ranks * base.workers
        speedup = rate / base.summary["samples_per_s"]
        out.append({"run": run, "units": units, "samples_per_s": rate, "speedup": speedup,
                    "efficiency": speedup * base_units / units})  # fmt: skip
    return out


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(INSTALL) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _offset(i: int, n: int) -> float:
    """Where run ``i`` of ``n`` puts its bar in a group of bars 0.8 wide."""
    return (i - (n - 1) / 2) * 0.8 / n


def _curves(plt, runs: list[Run], path: Path) -> bool:
    with_rows = [r for r in runs if r.rows]
    if not with_rows:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    from matplotlib.ticker import EngFormatter

    losses = []
    for run in with_rows:
        t = [row["time_s"] for row in run.rows]
        n = [row["samples"] for row in run.rows]
        acc = [100 * row["test_acc"] for row in run.rows]
        loss = [row["train_loss"] for row in run.rows]
        losses += [x for x in loss if x and x > 0]
        for ax, x, y in ((axes[0, 0], t, acc), (axes[0, 1], n, acc),
                         (axes[1, 0], t, loss), (axes[1, 1], n, loss)):  # fmt: skip
            ax.plot(x, y, marker="." if len(x) < 40 else None, label=run.label)
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
        if ax.get_yscale() == "linear":
            ax.ticklabel_format(axis="y", useOffset=False)
    axes[0, 0].legend(fontsize=8)
    _save(plt, fig, path, "Accuracy and loss against time and samples")
    return True


def _ranks(plt, runs: list[Run], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        rates, share = rank_figures(run)
        xs = [r + _offset(i, len(runs)) for r in range(len(rates))]
        a.bar(xs, rates, width, label=run.label)
        b.bar(xs, [100 * x for x in share], width, label=run.label)
    ranks = max(r.ranks for r in runs)
    for ax, what in ((a, "samples/s (its steps x batch / its training time)"),
                     (b, "communication wait (% of its training time)")):  # fmt: skip
        ax.set_xlabel("rank")
        ax.set_ylabel(what)
        ax.set_xticks(range(ranks))
        ax.set_ylim(bottom=0, top=None if ax.get_ylim()[1] > 0 else 1)
        ax.grid(alpha=0.3, axis="y")
    # headroom above the bars for the legend (it would hide the tallest ones)
    a.set_ylim(top=a.get_ylim()[1] * (1.1 + 0.07 * -(-len(runs) // 2)))
    a.legend(fontsize=7, ncol=2, loc="upper left")
    _save(plt, fig, path, "Per rank")


def _workers(plt, runs: list[Run], path: Path) -> bool:
    runs = [r for r in runs if r.summary.get("worker_processes") and r.summary.get("workers")]
    if not runs:
        return False
    cas = any(r.summary["workers"].get("cas_tries_hist") for r in runs)
    fig, axes = plt.subplots(1, 2 if cas else 1, figsize=(11 if cas else 6, 4), squeeze=False)
    a, b = axes[0, 0], axes[0, -1]
    bins = len(runs[0].summary["workers"]["staleness_hist"])
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        w = run.summary["workers"]
        off = _offset(i, len(runs))
        for ax, key in [(a, "staleness_hist")] + ([(b, "cas_tries_hist")] if cas else []):
            hist = w.get(key)
            if hist:
                total = max(1, sum(hist))
                ax.bar([k + off for k in range(len(hist))], [100 * h / total for h in hist],
                       width, label=run.label)  # fmt: skip
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
    _save(plt, fig, path, "Workers sharing a rank's model")
    return True


def _scaling(plt, points: list[dict], path: Path) -> bool:
    series: dict[tuple, list[dict]] = {}
    for p in points:
        series.setdefault((*p["run"].key, *p["run"].workload), []).append(p)
    series = {k: v for k, v in series.items() if len({p["units"] for p in v}) > 1}
    if not series:
        return False
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
                    ax.plot(x, y, style, label=name)
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
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
    _save(plt, fig, path, "Scaling (speed-up against the smallest ranks x W of each series)")
    return True


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_report(folders: list[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its PNGs for the runs in ``folders``; returns the report."""
    runs = load_runs(folders)
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    points = scaling(runs)
    figures = []
    if _curves(plt, runs, out / "curves.png"):
        figures.append(("Accuracy and loss", "curves.png"))
    _ranks(plt, runs, out / "ranks.png")
    figures.append(("Per rank", "ranks.png"))
    if _workers(plt, runs, out / "workers.png"):
        figures.append(("Workers", "workers.png"))
    if _scaling(plt, points, out / "scaling.png"):
        figures.append(("Scaling", "scaling.png"))
    by_run = {id(p["run"]): p for p in points}
    parent = Path(os.path.commonpath([r.path.resolve() for r in runs]))
    names = ", ".join(f"`{r.path.resolve().relative_to(parent)}`" for r in runs)
    lines = ["# hpc-asgd report", "", f"{len(runs)} run(s) in `{parent}`: {names}", ""]
    head = "| run | ranks | W | epochs | samples/s | speed-up | efficiency | test acc | train s |"
    lines += [head + " comm wait |", "|---|" + "---:|" * 9]
    for run in runs:
        s, p = run.summary, by_run.get(id(run), {})
        _, share = rank_figures(run)
        wait = max((x for x in share if not math.isnan(x)), default=None)
        lines.append(
            f"| {run.label} | {run.ranks} | {run.workers} | {_fmt(s.get('epochs'), 'g')} | "
            f"{_fmt(s.get('samples_per_s'), ',.0f')} | {_fmt(p.get('speedup'), '.2f')} | "
            f"{_fmt(p.get('efficiency'), '.2f')} | {_fmt(s.get('final_test_acc'), '.4f')} | "
            f"{_fmt(max(s.get('train_s') or [math.nan]), '.1f')} | "
            f"{'-' if wait is None else f'{100 * wait:.1f}%'} |"
        )
    lines += ["", "comm wait: the largest share of a rank's training time spent waiting in"
              " communication. Speed-up: against the smallest ranks x W of the same algorithm"
              " and update rule.", ""]  # fmt: skip
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
