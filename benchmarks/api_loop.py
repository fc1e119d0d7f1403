"""hpc_asgd's Python API in a plain training loop against torch's and torchft's local SGD.

On 2 ranks, the model and data of ``examples/own_loop.py`` (WaveNet, 8 classes, batch 32 per
rank, AdamW lr 3e-3, one torch thread per rank) are trained in the same loop
(``peers/api_loop_rank.py``) by each contender at the same K: no synchroniser (``none``),
hpc_asgd's LASGD / LocalAsync over the mpi and gloo engines, its blocking LocalSGD, torch's
PostLocalSGDOptimizer + PeriodicModelAverager, and torchft's LocalSGD (a lighthouse of ours
on 127.0.0.1, two replica groups of one process). Repeats interleaved (rotated order);
medians, [min-max], ratios of medians and paired ratios; ``<out>/api_loop.json`` and ``.md``.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from importlib import metadata

import _harness as h

RANK_SCRIPT = str(h.ROOT / "benchmarks" / "peers" / "api_loop_rank.py")
MARK = "API_LOOP_RANK "
RANKS = 2
OURS = ("ours-lasgd-mpi", "ours-local-async-mpi", "ours-lasgd-gloo", "ours-local-async-gloo")
CONTENDERS = ("none", *OURS, "ours-local-sgd-gloo", "torch-postlocal", "torchft-localsgd")
EXTRA = ("ours-local-sgd-mpi",)  # on request (--contenders)
# (denominator, goal: ours / it >= this), for each of OURS
GOALS = (("none", 0.95), ("torch-postlocal", 1.1), ("torchft-localsgd", 1.4))
BLOCKING = (("ours-local-sgd-gloo", "torch-postlocal"), ("ours-local-sgd-gloo", "torchft-localsgd"))
FIGURES = ("samples_per_s", "aggregate_samples_per_s", "train_s", "final_test_acc", "rounds",
           "comm_wait_s", "comm_overlap", "cpu_ms_per_step")  # fmt: skip
HEAD = ["contender", "samples/s", "aggregate", "train s", "test acc", "rounds", "wait s", "overlap",
        "CPU ms/step", "errors"]  # fmt: skip


# ---- one run --------------------------------------------------------------------------------
class Lighthouse:
    """torchft's lighthouse on 127.0.0.1 (a free port) for one run, in this process."""

    def __init__(self, replicas: int = RANKS) -> None:
        from torchft.coordination import LighthouseServer

        self.server = LighthouseServer(bind="127.0.0.1:0", min_replicas=replicas)
        self.address = "http://127.0.0.1:" + self.server.address().rsplit(":", 1)[1]

    def __enter__(self) -> Lighthouse:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def opts_of(args: argparse.Namespace) -> dict:
    return {"samples": args.samples, "classes": args.classes, "seed": args.seed,
            "width": args.width, "lr": args.lr, "batch_size": args.batch_size,
            "steps": args.steps, "period": args.period, "timeout": args.comm_timeout}  # fmt: skip


def launch(args: argparse.Namespace, name: str) -> dict:
    """One ``mpirun -n 2`` job of one contender: the ranks' lines, combined."""
    env = h.mpi_env()
    opts = opts_of(args)
    cmd = [h.mpirun_exe(args.mpirun), "-n", str(RANKS), "--oversubscribe", "--bind-to", "none"]
    if name == "torch-postlocal":
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(s.getsockname()[1])
    t0 = time.monotonic()
    if name == "torchft-localsgd":
        with Lighthouse() as lighthouse:
            opts["lighthouse"] = lighthouse.address
            proc = h.run_tree([*cmd, sys.executable, RANK_SCRIPT, name, json.dumps(opts)],
                              args.run_timeout, env)  # fmt: skip
    else:
        proc = h.run_tree([*cmd, sys.executable, RANK_SCRIPT, name, json.dumps(opts)],
                          args.run_timeout, env)  # fmt: skip
    res: dict = {"job_s": round(time.monotonic() - t0, 2)}
    if proc is None:
        return {**res, "error": f"ran past --run-timeout {args.run_timeout} s"}
    lines = [json.loads(ln[len(MARK) :]) for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or len(lines) != RANKS:
        tail = (proc.stdout + proc.stderr)[-2000:]
        return {**res, "error": f"rc {proc.returncode}, {len(lines)} rank lines: {tail}"}
    return {**res, **combine(sorted(lines, key=lambda r: r["rank"]), args.batch_size)}


def combine(ranks: list[dict], batch: int) -> dict:
    """The job's figures from its ranks' lines: samples/s = every rank's samples / the slowest
    rank's training time; aggregate = the sum of each rank's own rate."""
    steps = [r["steps"] for r in ranks]
    train_s = [r["train_s"] for r in ranks]
    out = {
        "steps_per_rank": steps,
        "train_s_per_rank": train_s,
        "train_s": max(train_s),
        "samples": sum(steps) * batch,
        "samples_per_s": sum(steps) * batch / max(train_s),
        "aggregate_samples_per_s": sum(s * batch / t for s, t in zip(steps, train_s, strict=True)),
        "test_acc_per_rank": [r["acc"] for r in ranks],
        "final_test_acc": min(r["acc"] for r in ranks),  # each rank's own final model
        "rounds": max(r["rounds"] for r in ranks),
        "comm_wait_s": max(r.get("comm_s", 0.0) for r in ranks),
        # CPU ms per step of the rank processes (every thread): less sensitive to other jobs
        "cpu_ms_per_step": 1e3 * sum(r["cpu_s"] for r in ranks) / sum(steps),
    }
    stats = [r["stats"] for r in ranks if "stats" in r]
    if stats:  # ours: over the ranks, 1 - waited / in flight
        inflight = sum(s["comm_inflight_s"] for s in stats)
        wait = sum(s["comm_wait_s"] for s in stats)
        out["comm_overlap"] = max(0.0, 1 - wait / inflight) if inflight > 0 else None
        out["comm_overlap_per_rank"] = [s["comm_overlap"] for s in stats]
        out["comm_inflight_s"] = max(s["comm_inflight_s"] for s in stats)
        out["engine"] = ranks[0]["engine"]
    return out


# ---- statistics -----------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs": len(runs), "errors": len(runs) - len(ok)}
    for key in FIGURES:
        vals = [r[key] for r in ok if r.get(key) is not None]
        if vals:
            out[key] = h.median(vals)
            out[f"{key}_min"], out[f"{key}_max"] = min(vals), max(vals)
    return out


def per_repeat(runs: list[dict], key: str = "samples_per_s") -> list:
    return [None if "error" in r else r.get(key) for r in runs]


def ratios(report: dict) -> list[dict]:
    """ours / each peer (the issue's goals), and the blocking LocalSGDs (no goal)."""
    res, raw = report["results"], report["runs"]
    pairs = [(o, d, g) for o in OURS for d, g in GOALS]
    pairs += [(a, b, None) for a, b in BLOCKING]
    out = []
    for num, den, goal in pairs:
        if num not in res or den not in res:
            continue
        value = h.ratio(res[num].get("samples_per_s"), res[den].get("samples_per_s"))
        agg = h.ratio(res[num].get("aggregate_samples_per_s"),
                      res[den].get("aggregate_samples_per_s"))  # fmt: skip
        paired = h.paired(per_repeat(raw[num]), per_repeat(raw[den]))
        met = None if goal is None else value is not None and value >= goal
        out.append({"num": num, "den": den, "ratio": value, "paired": paired,
                    "aggregate_ratio": agg, "goal": goal, "met": met})  # fmt: skip
    return out


# ---- the report -----------------------------------------------------------------------------
def markdown(report: dict) -> str:
    a, res = report["args"], report["results"]

    def rng(e: dict, key: str, spec: str) -> str:
        if key not in e:
            return "-"
        return f"{e[key]:{spec}} [{e[key + '_min']:{spec}}-{e[key + '_max']:{spec}}]"

    rows = [
        [c, rng(e, "samples_per_s", ".0f"), rng(e, "aggregate_samples_per_s", ".0f"),
         rng(e, "train_s", ".2f"), rng(e, "final_test_acc", ".3f"), h.fmt(e.get("rounds"), ".0f"),
         h.fmt(e.get("comm_wait_s"), ".3f"), h.fmt(e.get("comm_overlap"), ".2f"),
         rng(e, "cpu_ms_per_step", ".2f"), f"{e['errors']}/{e['runs']}"]
        for c, e in res.items()
    ]  # fmt: skip
    verdict = {True: "met", False: "**missed**", None: "(no goal)"}
    ratio_rows = [
        [f"{r['num']} / {r['den']}", h.fmt(r["ratio"], ".3f"), h.fmt(r["paired"], ".3f"),
         h.fmt(r["aggregate_ratio"], ".3f"), "-" if r["goal"] is None else f">= {r['goal']}",
         verdict[r["met"]]]
        for r in report["ratios"]
    ]  # fmt: skip
    accs = [v for e in res.values() for v in [e.get("final_test_acc_min")] if v is not None]
    learned = "every run of every contender" if accs and min(accs) >= 0.9 else "NOT every run"
    pv = report["peer_versions"]
    skipped = "".join(f" Skipped: {c} ({why})." for c, why in report["skipped"].items())
    lines = [
        *h.header(report, "The Python API in a plain loop: samples/s against torch and torchft"),
        f"torchft-nightly {pv.get('torchft-nightly') or 'not installed'}. "
        f"{RANKS} ranks (`mpirun -n {RANKS} --oversubscribe --bind-to none`), one torch thread "
        f"each; WaveNet width {a['width']}, {a['classes']} classes, {a['samples']} training "
        f"waveforms, batch {a['batch_size']} per rank, AdamW lr {a['lr']}, K = {a['period']}, "
        f"{a['steps']} steps per rank ({a['steps'] * RANKS} for the job), {a['repeats']} "
        f"repeats interleaved in rotated order.{skipped}",
        "",
        "Medians over repeats, [min-max] in brackets. samples/s: every rank's samples / the "
        "slowest rank's training time (first step to the end of the last, with the "
        "synchroniser's end: ours drains its rounds and takes the final exact average, torch "
        "one last `average_parameters`); aggregate: the sum of each rank's own rate. Accuracy: "
        "the worse of the two ranks' own final models on 2,048 test waveforms. wait: seconds "
        "the slowest-waiting rank spent in the synchroniser's communication (ours: "
        "`comm_wait_s`; torch: `average_parameters`; torchft: `sync`); overlap: "
        "1 - wait / in flight, over both ranks (ours). rounds: the larger of the ranks' counts; "
        "ours' non-blocking synchronisers keep at most one round in flight and advance it at "
        "the optimizer's hook, so they may make fewer than steps / K. CPU ms/step: the ranks' "
        "CPU time (every thread) over the loop / their steps, which other jobs on the machine "
        "disturb less.",
        "",
        *h.table(HEAD, rows, "lr"),
        "",
        f"Test accuracy >= 0.9: {learned}.",
        "",
        "Ratios of median samples/s; paired: the median over repeats of the per-repeat ratio; "
        "aggregate: the ratio of median aggregate rates.",
        "",
        *h.table(
            ["ratio", "of medians", "paired", "aggregate", "goal", "verdict"], ratio_rows, "lr"
        ),
        "",
        h.disturbance_line(report),
        "",
    ]
    return "\n".join(lines)


def torchft_version() -> str | None:
    try:
        return metadata.version("torchft-nightly")
    except metadata.PackageNotFoundError:
        return None


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    report = h.new_report("api_loop", argv, args)
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's per-quorum INFO lines; before its import
    report["skipped"] = {}
    report["peer_versions"] = {"torchft-nightly": torchft_version()}
    contenders = list(args.contenders)
    if "torchft-localsgd" in contenders:
        try:
            import torchft  # noqa: F401 (only whether it imports)
        except ImportError as e:
            why = f"torchft does not import ({e}); pip install 'hpc_asgd[bench]'"
            print(f"  torchft-localsgd skipped: {why}", flush=True)
            report["skipped"]["torchft-localsgd"] = why
            contenders.remove("torchft-localsgd")
    raw: dict[str, list] = {c: [] for c in contenders}
    for rep in range(args.repeats):
        for c in h.rotated(contenders, rep):
            res = h.guarded(lambda c=c: launch(args, c), args, c)
            raw[c].append(res)
            shown = res.get("error") or (
                f"{res['samples_per_s']:.0f} samples/s, acc {res['final_test_acc']:.3f}, "
                f"{res['rounds']} rounds, train {res['train_s']:.2f} s"
                + (f", overlap {res['comm_overlap']:.2f}" if res.get("comm_overlap") else "")
            )
            print(f"  repeat {rep + 1}/{args.repeats} {c}: {shown}", flush=True)
    report["runs"] = raw
    report["disturbance"] = h.disturbance([r for v in raw.values() for r in v])
    report["results"] = {c: summarise(v) for c, v in raw.items()}
    report["ratios"] = ratios(report)
    h.write_report(report, markdown, args.stem, mpi=True)
    failed = [c for c, e in report["results"].items() if e["errors"]]
    if failed:
        print(f"api_loop: runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", nargs="+", choices=(*CONTENDERS, *EXTRA),
                   default=list(CONTENDERS))  # fmt: skip
    h.options(
        p,
        ("--repeats", 5, "runs of each contender, interleaved"),
        ("--steps", 1000, "steps per rank (a multiple of --period)"),
        ("--period", 8, "K: local steps between averaging rounds, for every contender"),
        ("--width", 32, "WaveNet's channels (the example's: 32)"),
        ("--batch-size", 32, "per rank"),
        ("--lr", 3e-3, "AdamW's learning rate"),
        ("--classes", 8),
        ("--samples", 8192, "training waveforms (all ranks)"),
        ("--seed", 0),
        ("--comm-timeout", 60.0, "deadline of every collective wait in the ranks (s)"),
        ("--run-timeout", 180.0, "a job running longer is killed whole and counted as failed"),
        ("--max-foreign", 0.5, "retry a run during which other jobs used more cores than this"),
        ("--retries", 1, "retries of a disturbed run"),
        ("--idle-wait", 10.0, "seconds to wait before a run for other jobs to fall below that"),
        ("--stem", "api_loop", "name of the result files"),
        h.OUT,
        h.MPIRUN,
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.period < 1 or args.steps < args.period:
        p.error("--repeats >= 1, --period >= 1 and --steps >= --period")
    if args.steps % args.period:
        p.error("--steps must be a multiple of --period (torchft's last sync is at the end)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return driver(parse(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
