"""Final test accuracy at an equal job budget, over seeds: every synchroniser against sync.

Issue 24, section 5 (the papers' "competitive accuracy" claim). Each (ranks, contender, K, seed)
is one fresh ``mpirun -n R --oversubscribe`` job of ``python -m hpc_asgd.cli train`` on the same
generated task (``tasks.py``: ``--dataset tasks:clusters``, on the ranks' ``PYTHONPATH``), model,
inner SGD, global batch (``--global-batch`` split over the ranks, so sync takes the same steps at
every R and every K-averaging algorithm averages every K * global batch samples) and epochs
(``--budget job``, the CLI's default). Contenders: sync; local-sgd, local-async, lasgd and
blocking hier-avg (groups of R / 2 ranks, two "nodes": at 2 ranks single ranks, i.e. K-AVG through
hier-avg's code; group rounds every K1 = ``--local-period`` steps, global ones every K), each also
with the outer Nesterov step (``+outer``). The seed sets the initialisation and the data order; the
data are the same for every run.

Per rank count and contender: mean, standard deviation and range of the final test accuracy
(after the final exact average) over the seeds, the difference to sync's mean in points, and the
spread of the per-seed (paired) differences; the goal is every contender within ``--tolerance``
points of sync at K <= 16 (where one misses, by how much and whether +outer closes it). sync's
test accuracy per epoch, every seed, is the evidence that the task needs ~10 epochs and that each
seed is past the initial loss plateau. Outputs ``<out>/<stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
import tasks

BASES = ("local-sgd", "local-async", "lasgd", "hier-avg")
CONTENDERS = ("sync", *(f"{b}{x}" for b in BASES for x in ("", "+outer")))
HERE = Path(__file__).resolve().parent


# ---- one run ----------------------------------------------------------------------------------
def algo_flags(args, name: str, ranks: int, k: int) -> dict:
    """The contender's ``hpc-asgd train`` flags at K (sync: none of K's)."""
    base = name.removesuffix("+outer")
    if base == "sync":
        flags: dict = {"algo": "sync"}
    elif base == "hier-avg":
        k1 = min(args.local_period, k)
        flags = {"algo": "hier-avg", "hier-mode": "blocking", "group-size": max(1, ranks // 2),
                 "local-period": k1, "global-period": k // k1}  # fmt: skip
    else:
        flags = {"algo": base, "period": k}
    if name.endswith("+outer"):
        flags.update({"outer-lr": args.outer_lr, "outer-momentum": args.outer_momentum,
                      "outer-nesterov": args.outer_nesterov})  # fmt: skip
    return flags


def job_cmd(args, name: str, ranks: int, k: int, seed: int, out: Path) -> list[str]:
    flags = {"dataset": args.dataset, "data-dir": data_dir(args, out.parent), "model": args.model,
             "batch-size": args.global_batch // ranks, "lr": args.lr, "momentum": args.momentum,
             "epochs": args.epochs, "eval-every": args.eval_every, "seed": seed,
             "comm-timeout": args.comm_timeout, "out": out}  # fmt: skip
    flags.update(algo_flags(args, name, ranks, k))
    mpirun = [h.mpirun_exe(args.mpirun), "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]
    return [*mpirun, *h.train_cmd(flags)]


def data_dir(args, tmp: Path) -> str | None:
    """``--data-dir``; for tasks.py's set without one, the folder ``tasks.cache`` wrote."""
    return args.data_dir or (str(tmp) if (tmp / tasks.CACHE).exists() else None)


def read_run(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    keep = ("final_test_acc", "final_test_loss", "averaging_rounds", "consensus", "wall_s",
            "launch_s", "train_s", "steps_per_rank")  # fmt: skip
    res = {key: s.get(key) for key in keep}
    res["curve"] = [{key: r[key] for key in ("epoch", "test_acc", "train_loss")} for r in rows]
    return res


def one_run(args, name: str, ranks: int, k: int, seed: int, tmp: Path) -> dict:
    """One job; its figures, or an ``error`` (the run is reported as failed, not dropped)."""
    out = Path(tempfile.mkdtemp(prefix=f"{name}-R{ranks}-K{k}-s{seed}-", dir=tmp))
    cmd = job_cmd(args, name, ranks, k, seed, out)
    env = h.mpi_env()
    env["PYTHONPATH"] = f"{HERE}:{env['PYTHONPATH']}"  # tasks.py, for every rank
    res: dict = {"contender": name, "ranks": ranks, "K": k, "seed": seed,
                 "command": shlex.join(cmd)}  # fmt: skip
    probe, t0 = h.Foreign(), time.monotonic()
    proc = h.run_tree(cmd, args.run_timeout, env)
    res["job_s"] = round(time.monotonic() - t0, 2)
    foreign = probe.cores()
    res["foreign_cores"] = round(foreign, 3) if math.isfinite(foreign) else None
    if proc is None:
        res["error"] = f"ran past --run-timeout {args.run_timeout} s"
    elif proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        res["error"] = f"rc {proc.returncode}: " + " / ".join(tail)[-600:]
    else:
        try:
            res.update(read_run(out))
        except (OSError, ValueError, KeyError) as e:
            res["error"] = f"no result: {e!r}"
    if res.get("final_test_acc") is None and "error" not in res:
        res["error"] = "no final_test_acc in summary.json"
    if args.keep_runs:
        Path(args.keep_runs).mkdir(parents=True, exist_ok=True)
        shutil.move(out, Path(args.keep_runs) / out.name)
    else:
        shutil.rmtree(out, ignore_errors=True)
    return res


# ---- figures ----------------------------------------------------------------------------------
def points(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def summarise(runs: list[dict], sync: dict[int, float]) -> dict:
    """Mean, sd, range over the seeds; difference to sync's mean and the paired differences."""
    ok = [r for r in runs if "error" not in r]
    acc = [r["final_test_acc"] for r in ok]
    out: dict = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok),
                 "per_seed": {r["seed"]: r["final_test_acc"] for r in ok}}  # fmt: skip
    out["mean"] = statistics.fmean(acc) if acc else None
    out["std"] = statistics.stdev(acc) if len(acc) > 1 else None
    out["min"], out["max"] = (min(acc), max(acc)) if acc else (None, None)
    out["rounds"] = h.median([r.get("averaging_rounds") for r in ok])
    out["no_consensus"] = [r["seed"] for r in ok if r.get("consensus") is False]
    paired = [points(a - sync[s]) for s, a in out["per_seed"].items() if s in sync]
    sync_mean = statistics.fmean(sync.values()) if sync else None
    out["diff_pts"] = points(out["mean"] - sync_mean) if acc and sync_mean is not None else None
    out["paired_sd_pts"] = statistics.stdev(paired) if len(paired) > 1 else None
    return out


def results(args, runs: list[dict]) -> dict:
    """``{"R|contender|K": summary}``; sync's row (K 1) is the reference of every K."""
    res = {}
    for ranks in args.ranks:
        of = [r for r in runs if r["ranks"] == ranks]
        sync = {r["seed"]: r["final_test_acc"] for r in of
                if r["contender"] == "sync" and "error" not in r}  # fmt: skip
        for name, k in plan_cases(args):
            mine = [r for r in of if r["contender"] == name and r["K"] == k]
            res[f"{ranks}|{name}|{k}"] = summarise(mine, sync)
    return res


def goal_cell(s: dict | None, tol: float) -> tuple[str, bool | None]:
    if s is None or s["diff_pts"] is None:
        return "-", None
    met = s["diff_pts"] >= -tol
    return f"{s['diff_pts']:+.2f}", met


def goals(args, res: dict) -> list[dict]:
    """Per R, K <= --goal-max-k and algorithm: plain and +outer against sync's mean."""
    out = []
    for ranks in args.ranks:
        for k in (k for k in args.periods if k <= args.goal_max_k):
            for base in BASES:
                plain = res.get(f"{ranks}|{base}|{k}")
                outer = res.get(f"{ranks}|{base}+outer|{k}")
                if plain is None and outer is None:
                    continue
                pd, pm = goal_cell(plain, args.tolerance)
                od, om = goal_cell(outer, args.tolerance)
                closes = None if pm is not False else om
                out.append({"ranks": ranks, "K": k, "algo": base, "plain_diff_pts": pd,
                            "plain_met": pm, "outer_diff_pts": od, "outer_met": om,
                            "outer_closes_gap": closes})  # fmt: skip
    return out


def sync_curves(args, runs: list[dict]) -> dict:
    """Per R: sync's test accuracy and training loss per epoch, every seed."""
    out = {}
    for ranks in args.ranks:
        ok = [r for r in runs if r["ranks"] == ranks and r["contender"] == "sync"
              and "error" not in r]  # fmt: skip
        if ok:
            out[ranks] = {r["seed"]: r["curve"] for r in sorted(ok, key=lambda r: r["seed"])}
    return out


def convergence(curves: dict) -> dict:
    """First epoch at which sync's mean accuracy is within 1 and 0.5 points of its final."""
    accs = [[row["test_acc"] for row in c] for c in curves.values()]
    n = min(map(len, accs))
    mean = [statistics.fmean(a[i] for a in accs) for i in range(n)]
    epochs = [row["epoch"] for row in next(iter(curves.values()))[:n]]

    def first_within(pts):
        return next(e for e, m in zip(epochs, mean, strict=True) if m >= mean[-1] - pts / 100)

    last_loss = [c[n - 1]["train_loss"] for c in curves.values()]
    return {"within_1pt_epoch": first_within(1.0), "within_half_pt_epoch": first_within(0.5),
            "final_mean": mean[-1], "final_train_loss_max": max(last_loss),
            "first_train_loss": [c[0]["train_loss"] for c in curves.values()]}  # fmt: skip


# ---- Markdown ---------------------------------------------------------------------------------
def yes_no(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def result_rows(report: dict, ranks: int) -> list[list[str]]:
    f, rows = h.fmt, []
    for key, s in report["results"].items():
        r, name, k = key.split("|")
        if int(r) != ranks:
            continue
        runs = f"{s['runs_ok']}" + (f" ({s['runs_failed']} failed)" if s["runs_failed"] else "")
        rng = f"{s['min']:.4f}-{s['max']:.4f}" if s["min"] is not None else "-"
        diff = "(reference)" if name == "sync" else f(s["diff_pts"], "+.2f")
        note = f" (no consensus: seeds {s['no_consensus']})" if s["no_consensus"] else ""
        rows.append([name, k, runs, f(s["mean"], ".4f"), f(s["std"], ".4f"), rng, diff,
                     "-" if name == "sync" else f(s["paired_sd_pts"]),
                     f(s["rounds"], ".0f") + note])  # fmt: skip
    return rows


def curve_lines(report: dict) -> list[str]:
    lines = [f"No sync run finished at {r} ranks.\n" for r in report["args"]["ranks"]
             if r not in report["sync_curves"]]  # fmt: skip
    for ranks, curves in report["sync_curves"].items():
        conv = report["convergence"][ranks]
        seeds = list(curves)
        n = min(map(len, curves.values()))
        rows = []
        for i in range(n):
            accs = [curves[s][i]["test_acc"] for s in seeds]
            loss = [curves[s][i]["train_loss"] for s in seeds]
            epoch = curves[seeds[0]][i]["epoch"]
            mean, spread = statistics.fmean(accs), f"{min(loss):.2f}-{max(loss):.2f}"
            rows.append([f"{epoch:g}", *(f"{x:.3f}" for x in accs), f"{mean:.4f}", spread])
        head = ["epoch", *(f"seed {s}" for s in seeds), "mean", "train loss (min-max)"]
        lines += [
            f"### sync, {ranks} ranks: test accuracy per epoch", "",
            *h.table(head, rows, "r"), "",
            f"sync's mean comes within 1 point of its final ({conv['final_mean']:.4f}) at epoch "
            f"{conv['within_1pt_epoch']:g} and within 0.5 points at epoch "
            f"{conv['within_half_pt_epoch']:g}. First-epoch training loss "
            f"{min(conv['first_train_loss']):.2f}-{max(conv['first_train_loss']):.2f} (the "
            f"plateau of the initialisation: ln 10 = {math.log(10):.2f}); final-epoch training "
            f"loss at most {conv['final_train_loss_max']:.2f} on every seed.", "",
        ]  # fmt: skip
    return lines


def markdown(report: dict) -> str:
    a = report["args"]
    lines = h.header(report, "Final test accuracy at an equal job budget, over seeds")
    lines += [
        f"Task `{a['dataset']}` (benchmarks/tasks.py: {report['task']}), model `{a['model']}`; "
        f"{a['epochs']:g} epochs (job budget), global batch {a['global_batch']} (batch "
        f"{a['global_batch']} / R per rank), inner SGD lr {a['lr']} momentum {a['momentum']}, no "
        f"weight decay, constant lr; `+outer`: outer SGD lr {a['outer_lr']} momentum "
        f"{a['outer_momentum']} Nesterov {a['outer_nesterov']}. hier-avg: blocking, groups of "
        f"R / 2 ranks, K1 = {a['local_period']}, K2 = K / K1. Seeds {a['seeds']}; one fresh "
        "`mpirun --oversubscribe` job per run; evaluation every "
        f"{a['eval_every']:g} epoch on the {report['task_sizes']}.", "",
    ]  # fmt: skip
    cols = ["algorithm", "K", "runs", "mean acc", "std", "min-max", "Δ sync (pts)",
            "paired sd (pts)", "rounds"]  # fmt: skip
    for ranks in a["ranks"]:
        lines += [f"## {ranks} ranks", "", *h.table(cols, result_rows(report, ranks), "llr"), ""]
    rows = [[g["ranks"], g["K"], g["algo"], g["plain_diff_pts"], yes_no(g["plain_met"]),
             g["outer_diff_pts"], yes_no(g["outer_met"]), yes_no(g["outer_closes_gap"])]
            for g in report["goals"]]  # fmt: skip
    tol = a["tolerance"]
    head = ["ranks", "K", "algorithm", "Δ plain (pts)", f"within {tol:g}", "Δ +outer (pts)",
            f"+outer within {tol:g}", "+outer closes the gap"]  # fmt: skip
    lines += [f"## Goals: within {tol:g} point of sync's mean at K <= {a['goal_max_k']}", "",
              *h.table(head, rows, "rrl"), "", verdict(report), ""]  # fmt: skip
    lines += failed_lines(report)
    lines += ["## Evidence: sync converges slowly, every seed past the plateau", ""]
    lines += curve_lines(report)
    lines += [
        "mean acc, std, min-max: final test accuracy (after the final exact average) over the "
        "seeds that finished; std is the sample standard deviation. Δ sync: 100 x (mean - sync's "
        "mean at the same R). paired sd: standard deviation over seeds of the per-seed "
        "difference to sync (same seed: same initialisation and data order), in points. rounds: "
        "median averaging rounds (sync: one allreduce per step). A goal is met when Δ >= "
        f"-{tol:g} (above sync counts as met); '+outer closes the gap' is answered only where "
        "plain averaging misses. "
        f"{disturbance(report)}", "",
    ]  # fmt: skip
    return "\n".join(lines)


def verdict(report: dict) -> str:
    closes = {True: ", +outer closes it", False: ", +outer does not close it", None: ""}
    misses = [f"{g['algo']} (R {g['ranks']}, K {g['K']}): {g['plain_diff_pts']}"
              f"{closes[g['outer_closes_gap']]}"
              for g in report["goals"] if g["plain_met"] is False]  # fmt: skip
    misses += [f"{g['algo']}+outer (R {g['ranks']}, K {g['K']}): {g['outer_diff_pts']}"
               for g in report["goals"] if g["outer_met"] is False]  # fmt: skip
    judged = [g for g in report["goals"] for m in ("plain_met", "outer_met") if g[m] is not None]
    if not judged:
        return "No goal could be evaluated (no finished sync and averaging runs at K <= the bound)."
    return ("Every evaluated contender is within the tolerance of sync." if not misses
            else "Missed (points below sync's mean): " + "; ".join(misses) + ".")  # fmt: skip


def failed_lines(report: dict) -> list[str]:
    bad = [r for r in report["runs"] if "error" in r]
    if not bad:
        return ["No run failed.", ""]
    rows = [[r["ranks"], r["contender"], r["K"], r["seed"], r["error"].replace("|", "/")[:300]]
            for r in bad]  # fmt: skip
    return ["## Failed runs", "", *h.table(["ranks", "contender", "K", "seed", "error"], rows,
                                           "rllrl"), ""]  # fmt: skip


def disturbance(report: dict) -> str:
    d = h.disturbance(report["runs"])
    jobs = [r["job_s"] for r in report["runs"]]
    text = f"{len(jobs)} runs, job time median {h.fmt(h.median(jobs), '.1f')} s"
    if d["median_foreign_cores"] is None:
        return text + "."
    return (f"{text}; other jobs on the machine used median {d['median_foreign_cores']:.2f}, "
            f"max {d['max_foreign_cores']:.2f} cores during a run (not retried: the blocking "
            "algorithms' accuracy does not depend on timing, the non-blocking ones' "
            "may).")  # fmt: skip


# ---- driver -----------------------------------------------------------------------------------
def plan_cases(args) -> list[tuple[str, int]]:
    """(contender, K): sync once (K 1), every other contender at every K."""
    cases = [("sync", 1)] if "sync" in args.contenders else []
    return cases + [(n, k) for k in args.periods for n in args.contenders if n != "sync"]


def task_info(args) -> tuple[str, str]:
    """The task module's own description and its split sizes (for the report)."""
    if not args.dataset.startswith("tasks:"):
        return args.dataset, "its test set"
    desc = (f"make_classification, {tasks.CLASSES} classes x {tasks.CLUSTERS_PER_CLASS} "
            f"Gaussian clusters, {tasks.INFORMATIVE} informative of {tasks.FEATURES} features, "
            f"class_sep {tasks.CLASS_SEP}")  # fmt: skip
    return desc, f"{tasks.TEST} test samples ({tasks.TRAIN} training samples)"


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = h.new_report("accuracy", argv, args)
    report["task"], report["task_sizes"] = task_info(args)
    plan = [(r, n, k, s) for r in args.ranks for s in args.seeds for n, k in plan_cases(args)]
    print(f"  {len(plan)} runs", flush=True)
    runs = []
    tmp = Path(tempfile.mkdtemp(prefix="hpc_asgd_accuracy_"))
    try:
        if args.dataset == "tasks:clusters" and not args.data_dir:
            tasks.cache(tmp)  # once here, instead of scikit-learn in every rank
        for i, (ranks, name, k, seed) in enumerate(plan, 1):
            res = one_run(args, name, ranks, k, seed, tmp)
            runs.append(res)
            shown = (f"FAILED {res['error'][:300]}" if "error" in res
                     else f"acc {res['final_test_acc']:.4f}")  # fmt: skip
            print(f"  [{i}/{len(plan)}] R={ranks} {name} K={k} seed {seed}: {shown} "
                  f"({res['job_s']:.1f} s)", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["runs"] = runs
    report["results"] = results(args, runs)
    report["goals"] = goals(args, report["results"])
    report["sync_curves"] = sync_curves(args, runs)
    report["convergence"] = {r: convergence(c) for r, c in report["sync_curves"].items()}
    h.write_report(report, markdown, args.stem, mpi=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--periods", nargs="+", type=int, default=[16], help="K (sync: none)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    h.options(
        p,
        ("--epochs", 16.0, "job budget: passes over the training set, the ranks together"),
        ("--dataset", "tasks:clusters", "tasks.py's generated set (or any --dataset)"),
        ("--data-dir", None),
        ("--model", "mlp"),
        ("--global-batch", 128, "samples per step over all ranks: per-rank batch = this / R"),
        ("--lr", 0.1, "inner SGD"),
        ("--momentum", 0.0, "inner SGD (0: the outer step's momentum carries it, as DiLoCo's)"),
        ("--outer-lr", 0.7, "+outer (DiLoCo's)"),
        ("--outer-momentum", 0.9, "+outer"),
        ("--local-period", 4, "hier-avg's K1 (group rounds); K2 = K / K1"),
        ("--eval-every", 1.0, "epochs between evaluations"),
        ("--tolerance", 1.0, "goal: points of accuracy below sync's mean"),
        ("--goal-max-k", 16, "the goal holds at K <= this"),
        ("--comm-timeout", 120.0, "every rank's collective deadline (s)"),
        ("--run-timeout", 240.0, "seconds per mpirun job (killed whole, reported as failed)"),
        ("--keep-runs", None, "keep every run's folder here (hpc-asgd report)"),
        h.OUT,
        ("--stem", "accuracy", "output files <out>/<stem>.json and .md"),
        h.MPIRUN,
    )
    p.add_argument("--no-nesterov", dest="outer_nesterov", action="store_false",
                   help="+outer: plain (heavy-ball) outer momentum")  # fmt: skip
    args = p.parse_args(argv)
    bad_r = [r for r in args.ranks if r < 2 or args.global_batch % r]
    if bad_r:
        p.error(f"--ranks {bad_r}: need R >= 2 dividing --global-batch {args.global_batch}")
    if min(args.periods) < 1 or any(k % min(args.local_period, k) for k in args.periods):
        p.error("every K >= 1 and a multiple of --local-period (hier-avg's K1)")
    if args.epochs <= 0 or args.tolerance < 0:
        p.error("--epochs > 0 and --tolerance >= 0")
    return args


if __name__ == "__main__":
    sys.exit(driver(parse(sys.argv[1:]), sys.argv[1:]))
