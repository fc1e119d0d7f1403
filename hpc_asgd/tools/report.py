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

A run folder's files are anyone's: every field the report reads is checked for its type and
range (:func:`check_summary`, :func:`check_row`), and the first bad one ends it with one line
naming the file (and line); the outputs go to temporary names and are moved into place once
all are written (:class:`Outputs`), so an error leaves none half-written. ``predict`` shares
these helpers, and :func:`run_tool`: one line on stderr and exit 2, whatever went wrong.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hpc_asgd.errors import HpcAsgdError
from hpc_asgd.tools.safe_io import (
    BIG,
    MAX_BINS,
    MAX_RANKS,
    BadValue,
    Outputs,
    brief,
    mapping,
    number,
    numbers,
    parse_json,
    read_text,
    shown,
    text,
    why,
)

INSTALL = "the report's plots need matplotlib: pip install 'hpc_asgd[plot]'"


class ReportError(HpcAsgdError):
    """A folder that is no run, or an output that cannot be read or written."""


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

        def get(key: str, default: float) -> Any:
            return default if c.get(key) is None else c[key]

        out = []
        if get("slow_rank", -1) >= 0 and get("slow_factor", 1) != 1:
            out.append(f"rank {c['slow_rank']} x{c['slow_factor']:g}")
        if c.get("delay"):
            out.append(f"delay {c['delay']}")
        if get("pause_rank", -1) >= 0 and c.get("pause_at"):
            out.append(f"rank {c['pause_rank']} pauses {get('pause_s', 0):g} s")
        return tuple(out)


# metrics.jsonl: the fields the report reads, their range and whether null (non-finite) is one
ROW = {
    "time_s": (0.0, BIG, False),
    "samples": (0.0, BIG, False),
    "test_acc": (0.0, 1.0, True),
    "train_loss": (-BIG, BIG, True),
}


def check_summary(s: Any) -> None:
    """:class:`BadValue` at the first field of ``summary.json`` the report cannot use."""
    if not isinstance(s, dict):
        raise BadValue("not a JSON object")
    text(s["algo"], "algo")
    number(s["samples_per_s"], "samples_per_s", 0, BIG, null=True)
    for key in ("update", "dataset", "model"):
        text(s.get(key), key, null=True)
    for key, lo in (("world_size", 1), ("workers_per_rank", 1), ("worker_processes", 0)):
        number(s.get(key), key, lo, MAX_RANKS, integer=True, null=True)
    for key, hi in (("epochs", BIG), ("final_test_acc", 1.0), ("steps_per_rank", BIG)):
        number(s.get(key), key, 0, hi, null=True)
    for key in ("train_s", "steps_taken", "comm_wait_s"):
        numbers(s.get(key), key, null_items=True)
    c = mapping(s.get("config"), "config")
    number(c.get("batch_size"), "config.batch_size", 1, BIG, integer=True, null=True)
    for key in ("slow_rank", "pause_rank"):
        number(c.get(key), f"config.{key}", -1, MAX_RANKS, integer=True, null=True)
    for key in ("slow_factor", "pause_at", "pause_s"):
        number(c.get(key), f"config.{key}", 0, BIG, null=True)
    text(c.get("delay"), "config.delay", null=True)
    w = mapping(s.get("workers"), "workers")
    for key in ("staleness_hist", "cas_tries_hist"):
        numbers(w.get(key), f"workers.{key}", integer=True, most=MAX_BINS)


def _read_summary(path: Path) -> dict:
    value = parse_json(read_text(path, ReportError), f"{shown(path)}: not valid JSON", ReportError)
    if not isinstance(value, dict):
        raise ReportError(f"{shown(path)}: expected a JSON object")
    if "samples_per_s" not in value or "algo" not in value:
        raise ReportError(f"{shown(path)}: not an hpc-asgd summary")
    try:
        check_summary(value)
    except BadValue as e:
        raise ReportError(f"{shown(path)}: {e}") from None
    return value


def check_row(row: Any) -> None:
    """:class:`BadValue` at the first field of a ``metrics.jsonl`` row the report cannot use."""
    if not isinstance(row, dict):
        raise BadValue(f"{brief(row)}, not a JSON object")
    for key, (lo, hi, null) in ROW.items():
        if key not in row:
            raise BadValue(f"no field {key!r}")
        number(row[key], key, lo, hi, null=null)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(read_text(path, ReportError).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{shown(path)}: line {n}"
        row = parse_json(line, f"{where} is not valid JSON", ReportError, lines=False)
        try:
            check_row(row)
        except BadValue as e:
            raise ReportError(f"{where}: {e}") from None
        rows.append(row)
    return rows


def load_runs(folders: list[Path]) -> list[Run]:
    """The runs in ``folders`` (each a run folder or a folder of run folders), labelled."""
    try:
        return _label(_load(folders))
    except (OSError, RuntimeError) as e:  # a name too long, a symbolic link's loop, ...
        name = getattr(e, "filename", None)
        where = f"{shown(name)}: " if name else ""
        raise ReportError(f"{where}cannot read ({why(e)})") from None


def _load(folders: list[Path]) -> list[Run]:
    runs = []
    for folder in map(Path, folders):
        if (folder / "summary.json").is_file():
            found = [folder]
        else:
            found = sorted(p.parent for p in folder.glob("*/summary.json") if p.is_file())
            if not found:
                what = "no such folder" if not folder.is_dir() else "no summary.json in it"
                raise ReportError(
                    f"{shown(folder)}: {what} (a run's --out folder, or a folder of them, expected)"
                )
        for path in found:
            summary = _read_summary(path / "summary.json")
            runs.append(Run(path, summary, _read_rows(path / "metrics.jsonl")))
    return runs


def _label(runs: list[Run]) -> list[Run]:
    for run in runs:
        algo, update = run.key
        run.label = f"{algo}" + (f" {update} W={run.workers}" if run.workers > 1 else "")
        run.label += f", {run.ranks} rank{'s' if run.ranks > 1 else ''}"
        run.label += "".join(f", {d}" for d in run.delays)
    labels = [r.label for r in runs]
    for run in runs:  # the same configuration twice: name the folder too
        if labels.count(run.label) > 1:
            run.label += f" ({shown(run.path.name)})"
    return runs


def as_float(v: Any) -> float:
    """A checked number, or NaN for null (a non-finite figure)."""
    return math.nan if v is None else float(v)


def _ratio(a: float, b: float) -> float:
    x = a / b if b else math.nan
    return x if math.isfinite(x) else math.nan


def rank_figures(run: Run) -> tuple[list[float], list[float]]:
    """Per rank: samples/s over its own training time, and its communication-wait share
    (a list per rank of ``train_s``; NaN where a figure is missing)."""
    s = run.summary
    batch = (s.get("config") or {}).get("batch_size") or 0
    train = [as_float(t) for t in s.get("train_s") or []]
    k = len(train)
    taken = [as_float(n) for n in s.get("steps_taken") or [s.get("steps_per_rank") or 0] * k]
    wait = [as_float(w) for w in s.get("comm_wait_s") or [0.0] * k]
    taken, wait = (taken + [math.nan] * k)[:k], (wait + [math.nan] * k)[:k]
    rates = [_ratio(n * batch, t) for n, t in zip(taken, train, strict=True)]
    share = [_ratio(w, t) for w, t in zip(wait, train, strict=True)]
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


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(runs: list[Run], points: list[dict], figures: list[tuple[str, str]]) -> str:
    by_run = {id(p["run"]): p for p in points}
    parent = Path(os.path.commonpath([r.path.resolve() for r in runs]))
    names = ", ".join(f"`{shown(r.path.resolve().relative_to(parent))}`" for r in runs)
    lines = ["# hpc-asgd report", "", f"{len(runs)} run(s) in `{shown(parent)}`: {names}", ""]
    head = "| run | ranks | W | epochs | samples/s | speed-up | efficiency | test acc | train s |"
    lines += [head + " comm wait |", "|---|" + "---:|" * 9]
    for run in runs:
        s, p = run.summary, by_run.get(id(run), {})
        _, share = rank_figures(run)
        wait = max((x for x in share if not math.isnan(x)), default=None)
        train = max((as_float(t) for t in s.get("train_s") or []), default=math.nan)
        lines.append(
            f"| {run.label.replace('|', '/')} | {run.ranks} | {run.workers} | "
            f"{_fmt(s.get('epochs'), 'g')} | "
            f"{_fmt(s.get('samples_per_s'), ',.0f')} | {_fmt(p.get('speedup'), '.2f')} | "
            f"{_fmt(p.get('efficiency'), '.2f')} | {_fmt(s.get('final_test_acc'), '.4f')} | "
            f"{_fmt(train, '.1f')} | {'-' if wait is None else f'{100 * wait:.1f}%'} |"
        )
    lines += ["", "comm wait: the largest share of a rank's training time spent waiting in"
              " communication. Speed-up: against the smallest ranks x W of the same algorithm"
              " and update rule.", ""]  # fmt: skip
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def write_report(folders: list[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its PNGs for the runs in ``folders``; returns the report.
    Every file goes to a temporary name first and all are moved into place at the end: an
    error (always a :class:`ReportError` for bad input) leaves no file half-written."""
    from hpc_asgd.tools.plots import curves, plt_module, ranks, scaling_plot, workers

    runs = load_runs(folders)
    plt = plt_module()
    points = scaling(runs)
    before = set(plt.get_fignums())
    try:
        with Outputs(Path(out), ReportError) as files, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing glyphs, empty log axes: not errors
            drawn = (
                ("Accuracy and loss", "curves.png", curves(plt, runs)),
                ("Per rank", "ranks.png", ranks(plt, runs)),
                ("Workers", "workers.png", workers(plt, runs)),
                ("Scaling", "scaling.png", scaling_plot(plt, points)),
            )
            figures = []
            for title, name, fig in drawn:
                if fig is not None:
                    files.write(name, partial(fig.savefig, format="png", dpi=110))
                    figures.append((title, name))
            report = files.folder / "report.md"
            doc = markdown(runs, points, figures).encode("utf-8", "backslashreplace")
            files.write(report.name, lambda f: f.write(doc))
            files.commit()
    finally:  # this report's figures, drawn or not
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return report
