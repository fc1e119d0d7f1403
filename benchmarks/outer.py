"""The outer optimizer and the 16-bit payload against plain averaging and torchft's DiLoCo.

Two parts, each a fresh ``mpirun`` job per (contender, K, links, repeat), built by
``compare.py``'s ``launch`` (same model, data, shard order, inner SGD, evaluation schedule):

- ``ranks``: 2 ranks on this machine, K in ``--periods``: plain local-sgd, lasgd and
  local-async against the same with the outer Nesterov step (``+outer``: ``--outer-lr
  --outer-momentum --outer-nesterov``), and torchft's DiLoCo (``peers/diloco.py``, PyPI
  ``torchft-nightly``, a lighthouse started here for each run) with the same outer SGD.
  Goals: time to the target with the outer step <= 0.8x plain averaging's at K = 32; ours
  >= 1.2x DiLoCo's samples/s at the same K, with no worse time to the target.
- ``nodes`` (``--nodes N``, root, ``scripts/slurm_local.sh start --nodes N``): one rank per
  emulated node, links uncapped and all capped at ``--cap``, K in ``--node-periods``: the
  same contenders with the fp32 and the bf16 payload (``+bf16``: ``--avg-dtype bf16``). Goal:
  a round on capped links takes <= 0.55x the fp32 round's time, final accuracy within 0.5 points.

A round's time: the seconds a round was in flight (``comm_inflight_s``; DiLoCo: the inner steps
that end in a round) / the rounds, median over ranks. Medians over ``--repeats``; outputs
``<out>/<stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import operator
import os
import shutil
import sys
import tempfile
from pathlib import Path

import _harness as h
import compare as c
from api_loop import Lighthouse, torchft_version

RANK_CONTENDERS = ("local-sgd", "local-sgd+outer", "lasgd", "lasgd+outer", "local-async",
                   "local-async+outer", "torchft-diloco")  # fmt: skip
NODE_CONTENDERS = ("local-sgd", "local-sgd+bf16", "local-sgd+outer", "local-sgd+outer+bf16",
                   "lasgd+outer", "lasgd+outer+bf16")  # fmt: skip
LINKS = ("uncapped", "all-capped")
KEYS = ("samples_per_s", "time_to_target_s", "train_to_target_s", "final_test_acc", "round_ms",
        "setup_s", "averaging_rounds", "others_cores")  # fmt: skip
OPS = {">=": operator.ge, "<=": operator.le}


def run_args(args, part: str, name: str, k: int) -> argparse.Namespace:
    """compare.py's arguments for one job: K, the rank layout and the contender's flags."""
    ns = copy.copy(args)
    ns.period, ns.nodes = k, (args.nodes if part == "nodes" else 0)
    outer = {"outer-lr": args.outer_lr, "outer-momentum": args.outer_momentum}
    outer["outer-nesterov"] = args.outer_nesterov
    ns.extra_flags = {
        **(outer if "+outer" in name else {}),
        **({"avg-dtype": "bf16"} if "+bf16" in name else {}),
    }
    ns.peer_opts = {"outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum,
                    "outer_nesterov": args.outer_nesterov}  # fmt: skip
    return ns


def one_run(args, part: str, link: str, name: str, k: int, tmp: Path, nodes: list[str]) -> dict:
    ns = run_args(args, part, name, k)
    base = name.split("+", maxsplit=1)[0]
    try:
        with c.capped_links(nodes if link == "all-capped" else [], args.cap, args.burst):
            if base != "torchft-diloco":
                res = c.launch(ns, base, link, tmp)
            else:
                with Lighthouse(c.RANKS) as lighthouse:
                    ns.peer_opts["lighthouse"] = lighthouse.address
                    res = c.launch(ns, base, link, tmp)
    except c.subprocess.CalledProcessError as e:  # a link gone: the cluster was restarted
        return {"error": f"{e.cmd}: {e.stderr.strip()}"}
    if "error" not in res:
        rounds = res.get("averaging_rounds") or 0
        per_rank = [x / rounds * 1e3 for x in res.get("comm_inflight_s") or []] if rounds else []
        res["round_ms"] = h.median(per_rank)
    res.pop("rows", None)  # the evaluations: kept out of the JSON (time_to_target_s has them)
    return res


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok)}
    for key in KEYS:
        vals = [v for v in (r.get(key) for r in ok) if v is not None]
        out[key], out[key + "_range"] = h.median(vals), [min(vals), max(vals)] if vals else None
    out["reached_target"] = sum(r.get("time_to_target_s") is not None for r in ok)
    return out


def goals(report: dict) -> list[dict]:
    """The issue's goals as ratios (differences for accuracy) of medians, paired too."""
    res, raw, a = report["results"], report["runs"], report["args"]
    out = []

    def goal(text, num, den, key, op, threshold, diff=False):
        if num not in res or den not in res:
            return
        x, y = res[num].get(key), res[den].get(key)
        value = (x - y if diff else h.ratio(x, y)) if x is not None and y is not None else None
        per = [[None if "error" in r else r.get(key) for r in raw[k]] for k in (num, den)]
        out.append({"goal": text, "value": value, "paired": None if diff else h.paired(*per),
                    "threshold": threshold,
                    "met": value is not None and OPS[op](value, threshold)})  # fmt: skip

    tt = "train_to_target_s"
    for algo in ("local-sgd", "lasgd", "local-async"):
        num, den = (f"ranks|uncapped|K32|{algo}{x}" for x in ("+outer", ""))
        goal(f"K = 32: {algo} with the outer step reaches {a['target']} in <= 0.8x plain's "
             "training time", num, den, tt, "<=", 0.8)  # fmt: skip
    for k in a["periods"]:
        peer = f"ranks|uncapped|K{k}|torchft-diloco"
        for algo in ("local-sgd+outer", "lasgd+outer", "local-async+outer"):
            ours = f"ranks|uncapped|K{k}|{algo}"
            goal(f"K = {k}: {algo} samples/s >= 1.2x torchft DiLoCo's", ours, peer,
                 "samples_per_s", ">=", 1.2)  # fmt: skip
            goal(f"K = {k}: {algo} time to {a['target']} <= DiLoCo's (training time)", ours,
                 peer, tt, "<=", 1.0)  # fmt: skip
    for k in a["node_periods"]:
        for algo in (n for n in NODE_CONTENDERS if "+bf16" not in n):
            num, den = (f"nodes|all-capped|K{k}|{algo}{x}" for x in ("+bf16", ""))
            goal(f"capped, K = {k}: {algo} bf16 round time <= 0.55x fp32's", num, den,
                 "round_ms", "<=", 0.55)  # fmt: skip
            wire = [res.get(f"nodes|{lk}|K{k}|{algo}{x}", {}).get("round_ms")
                    for x in ("+bf16", "") for lk in LINKS[::-1]]  # fmt: skip
            if None not in wire:  # what the cap added: the skew of arrivals taken out
                value = h.ratio(wire[0] - wire[1], wire[2] - wire[3])
                text = f"capped, K = {k}: {algo} bf16 round time minus uncapped <= 0.55x fp32's"
                met = value is not None and 0 < value <= 0.55
                out.append({"goal": text + " (what the link adds)", "value": value,
                            "paired": None, "threshold": 0.55, "met": met})  # fmt: skip
            goal(f"capped, K = {k}: {algo} bf16 final accuracy within 0.5 points of fp32's",
                 num, den, "final_test_acc", ">=", -0.005, diff=True)  # fmt: skip
    return out


def markdown(report: dict) -> str:
    a, f = report["args"], h.fmt
    lines = h.header(report, "Outer optimizer and bf16 payload vs plain averaging and DiLoCo")
    lines += [
        f"Model `{a['model']}` on `{a['dataset']}`, batch {a['batch_size']} per rank, inner SGD "
        f"lr {a['lr']} momentum {a['momentum']}, {a['epochs']} epochs, evaluation every "
        f"{a['eval_every']} epoch; outer step (`+outer`, and DiLoCo's): SGD lr {a['outer_lr']} "
        f"momentum {a['outer_momentum']} Nesterov {a['outer_nesterov']}. torchft-nightly "
        f"{report['peer_versions'].get('torchft-nightly') or 'not installed'}. `ranks`: "
        f"{c.RANKS} ranks here (`mpirun --oversubscribe`)"
        + (
            f"; `nodes`: {a['nodes']} emulated nodes x 1 rank (`scripts/slurm_local.sh`), links "
            f"uncapped or all capped at {a['cap']} (tbf, both ways)"
            if a["nodes"]
            else ""
        )
        + f". Medians of {a['repeats']} repeats, [min-max].",
        "",
    ]
    cols = ["contender", "K", "samples/s", f"wall to {a['target']} (s)",
            f"train to {a['target']} (s)", "final acc", "round (ms)", "rounds",
            "others' CPU"]  # fmt: skip
    for part, link in report["tables"]:
        rows = []
        for key, s in report["results"].items():
            p, lk, k, name = key.split("|")
            if (p, lk) != (part, link):
                continue
            rng = s["samples_per_s_range"]
            reach = s["reached_target"] < s["runs_ok"]
            rows.append([
                name, k[1:], f(s["samples_per_s"], ".0f")
                + (f" [{rng[0]:.0f}-{rng[1]:.0f}]" if rng else ""),
                f(s["time_to_target_s"]) + (f" ({s['reached_target']}/{s['runs_ok']})" * reach),
                f(s["train_to_target_s"]), f(s["final_test_acc"], ".3f"),
                f(s["round_ms"], ".1f"), f(s["averaging_rounds"], ".0f"),
                f(s["others_cores"]) + (f" ({s['runs_failed']} failed)" * bool(s["runs_failed"])),
            ])  # fmt: skip
        lines += [f"## {part}, {link} links", "", *h.table(cols, rows, "lr"), ""]
    rows = [[g["goal"], f(g["value"], ".3f"), f(g["paired"]), "yes" if g["met"] else "no"]
            for g in report["goals"]]  # fmt: skip
    lines += ["## Goals", "", *h.table(["goal", "measured", "paired", "met"], rows, "lrrl"), ""]
    lines += [
        "samples/s: all ranks' samples / the slowest rank's training time. wall to target: "
        "seconds from the engine's start to the first evaluation at or above the target; train "
        "to target: without the set-up. round: seconds a round was in flight / rounds (median "
        "over ranks; blocking rounds: the time training waited, the skew of arrivals of ranks "
        "sharing 2 cores included, hence the goal's second form: capped minus uncapped, what "
        "the link adds). Final acc: ours after the final "
        "exact average; DiLoCo has none: each replica's own model, its last round K steps or "
        "less before. measured: a ratio of medians (accuracy: a difference); paired: the median "
        "of per-repeat ratios.",
        "",
    ]
    return "\n".join(lines)


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    os.environ.setdefault("RUST_LOG", "warn")  # the lighthouse's per-quorum INFO lines
    report = h.new_report("outer", argv, args)
    report["peer_versions"] = {"torchft-nightly": torftv} if (torftv := torchft_version()) else {}
    plan = [("ranks", "uncapped", n, k) for k in args.periods for n in args.contenders]
    nodes: list[str] = []
    if args.nodes:
        ns = copy.copy(args)
        ns.links = list(LINKS)
        nodes, _ = c.emulated_nodes(ns)
        plan += [("nodes", lk, n, k) for lk in LINKS for k in args.node_periods
                 for n in args.node_contenders]  # fmt: skip
    if not torftv:
        plan = [x for x in plan if x[2] != "torchft-diloco"]
        report["skipped"] = "torchft-diloco: torchft-nightly not installed (hpc_asgd[bench])"
    key_of = {x: "|".join((x[0], x[1], f"K{x[3]}", x[2])) for x in plan}
    runs: dict[str, list[dict]] = {key_of[x]: [] for x in plan}
    tmp = Path(tempfile.mkdtemp(prefix="hpc_asgd_outer_", dir="/var/tmp" if nodes else None))
    (tmp / "hosts").write_text("".join(f"{x} slots=1\n" for x in nodes))
    try:
        for rep in range(args.repeats):
            for x in h.rotated(plan, rep * 3):
                label = f"[{rep}] {key_of[x]}"
                res = h.quietest(
                    lambda x=x: one_run(args, *x, tmp, nodes), args.retry_noisy,
                    args.max_others, args.wait_quiet, label, "others_cores",
                )  # fmt: skip
                runs[key_of[x]].append({**res, "repeat": rep})
                if "error" in res:
                    print(f"  {label}: FAILED {res['error'][:400]}", flush=True)
                else:
                    print(f"  {label}: {res['samples_per_s']:.0f} samples/s, train to target "
                          f"{h.fmt(res['train_to_target_s'])} s, acc {res['final_test_acc']:.3f},"
                          f" round {h.fmt(res['round_ms'], '.1f')} ms", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.update(
        runs=runs,
        results={k: summarise(v) for k, v in runs.items()},
        tables=sorted({(x[0], x[1]) for x in plan}, key=lambda t: (t[0] != "ranks", t[1])),
    )
    report["goals"] = goals(report)
    h.write_report(report, markdown, args.stem, mpi=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", nargs="+", default=list(RANK_CONTENDERS),
                   choices=RANK_CONTENDERS, help="of the ranks part")  # fmt: skip
    p.add_argument("--node-contenders", nargs="+", default=list(NODE_CONTENDERS),
                   choices=NODE_CONTENDERS)  # fmt: skip
    p.add_argument("--periods", nargs="+", type=int, default=[8, 32, 128], help="K, ranks part")
    p.add_argument("--node-periods", nargs="+", type=int, default=[32], help="K, nodes part")
    h.options(
        p,
        ("--nodes", 0, "N > 1: also the nodes part on N emulated nodes (root only)"),
        ("--cap", "100mbit", "tc rate of a capped link"),
        ("--burst", "128kb", "tbf's burst"),
        ("--repeats", 3),
        ("--quick", False, "smoke run: 1 repeat of 4 epochs, K 8 only"),
        ("--epochs", 16.0, "passes over each rank's shard"),
        ("--target", 0.90, "test accuracy to time"),
        ("--dataset", "digits"),
        ("--data-dir", None),
        ("--model", "cnn"),
        ("--batch-size", 16, "per rank"),
        ("--lr", 0.1, "inner SGD (no momentum: the outer step carries it, as DiLoCo's)"),
        ("--momentum", 0.0),
        ("--outer-lr", 0.7, "DiLoCo's"),
        ("--outer-momentum", 0.9),
        ("--eval-every", 0.5, "epochs between evaluations"),
        ("--max-others", 0.25, "cores other processes may take during a run before it is noisy"),
        ("--wait-quiet", 0.0, "before each run, wait up to this many seconds for --max-others"),
        ("--retry-noisy", 0, "repeat a noisy run up to N times, keep the quietest"),
        h.OUT,
        ("--stem", "outer", "output files <out>/<stem>.json and .md"),
        h.MPIRUN,
        ("--run-timeout", 300.0, "seconds per mpirun job"),
    )
    p.add_argument("--no-nesterov", dest="outer_nesterov", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.periods, args.node_periods = 1, 4.0, [8], [8]
    if args.repeats < 1 or args.epochs <= 0 or min(args.periods + args.node_periods) < 1:
        p.error("--repeats >= 1, --epochs > 0 and every K >= 1")
    if args.nodes == 1 or args.nodes < 0:
        p.error("--nodes N needs N > 1")
    args.keep_runs, args.local_period, args.group_size = None, 1, 1  # compare.launch's
    return args


if __name__ == "__main__":
    sys.exit(driver(parse(sys.argv[1:]), sys.argv[1:]))
