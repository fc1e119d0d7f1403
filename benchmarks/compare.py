"""Train one model on 2 MPI ranks with every hpc_asgd synchroniser and with torch's own
data-parallel tools (``peers/ddp.py``); compare samples/s, time to a target accuracy, final
accuracy and the share of time blocked in communication, with and without a 2x straggler, and
(``--delay``, ``--pause-at``) under a real cluster's delays: random per-step delays on every rank
and worker, or one rank pausing once (``hpc-asgd train --delay / --pause-rank``).

Every contender (``WHAT``) gets the same model, data, batch order, SGD, evaluation schedule and
core budget, and runs as a fresh ``mpirun`` job per variant (rank 1 slowed 2x or not; random
delays; rank 1's pause), in an order rotated each repeat; noisy runs are repeated
(``--retry-noisy``); medians over repeats.
``--nodes N`` runs one rank on each of N emulated nodes instead, with the links uncapped or
capped (``--links``, ``--cap``; root only). Outputs ``<out>/<stem>.json`` and ``.md``;
benchmarks/README.md defines every column.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import operator
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
from peers.ddp import MARK as PEER_MARK

from hpc_asgd.delays import parse_delay
from hpc_asgd.errors import ConfigError

OURS = ("sync", "local-sgd", "local-async", "lasgd", "hier-avg", "hier-avg-nb")
# fixed steps per rank (--budget rank, the old default): not run unless named in --contenders
RANKED = ("local-async-rank", "lasgd-rank")
BASELINES = ("none", "none-spawn", "single")
PEERS = ("torch-ddp", "torch-postlocal", "torch-hier")
CONTENDERS = (*OURS, *BASELINES, *PEERS)
RANKS = 2
SLOW_RANK, SLOW_FACTOR = 1, 2.0
VARIANT = {False: "even", True: "slow"}  # a run's key: contender|variant
NO_BASELINES = ("slow", "pause")  # variants that only make sense with 2 ranks that average
LINKS = ("uncapped", "one-capped", "all-capped")  # --nodes: the link settings
NODE_CONTENDERS = ("sync", "local-sgd", "local-async", "lasgd", "hier-avg", "torch-ddp")
NONBLOCKING = ("local-async", "lasgd", "hier-avg-nb", *RANKED)
PEER_SCRIPT = str(Path(__file__).resolve().parent / "peers" / "ddp.py")
PEER_SCRIPTS = {"torchft-diloco": str(Path(PEER_SCRIPT).with_name("diloco.py"))}  # outer.py's
WHAT = {
    "sync": "`--algo sync` (gradient allreduce every step)",
    "local-sgd": "`--algo local-sgd --period K` (blocking)",
    "local-async": "`--algo local-async --period K` (W=1 spawned worker)",
    "lasgd": "`--algo lasgd --period K`",
    "local-async-rank": "local-async as above, `--budget rank` (fixed steps per rank)",
    "lasgd-rank": "lasgd as above, `--budget rank` (fixed steps per rank)",
    "hier-avg": "`--algo hier-avg --group-size S --local-period K1 --global-period K/K1`",
    "hier-avg-nb": "hier-avg as above, `--hier-mode nonblocking`",
    "none": "`--algo none` (no averaging, in process)",
    "none-spawn": "`--algo none --spawn-workers` (W=1 spawned worker)",
    "single": "one process alone (`mpirun -n 1`, every core's thread), `--algo none`",
    "torch-ddp": "DDP + SGD (Gloo)",
    "torch-postlocal": "DDP + post-local hook + PostLocalSGDOptimizer(PeriodicModelAverager K)",
    "torch-hier": "DDP + post-local hook + HierarchicalModelAverager {K1: S, K: ranks}",
}
OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
MEDIANS = ("samples_per_s", "aggregate_samples_per_s", "time_to_target_s", "train_to_target_s",
           "setup_s", "final_test_acc", "wall_s", "job_s", "others_cores")  # fmt: skip


# ---- the links of emulated nodes (scripts/slurm_local.sh start --nodes N) ---------------------
def rate_bits(rate: str) -> float:
    """tc's rate in bit/s: ``100mbit`` -> 1e8 (bit units only; tc's ``bps`` means bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected a number and kbit, mbit, gbit or bit")
    return float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]


def link_tc(node: str, *tc: str) -> list[list[str]]:
    """``tc`` on NODE's link: [0] the host side hv-NODE (traffic to the node), [1] the node's
    own eth0 (traffic from it), entered by its network namespace (root only)."""
    host = ["tc", "qdisc", tc[0], "dev", f"hv-{node}", "root", *tc[1:]]
    inside = ["nsenter", f"--net=/run/netns/{node}", *host[:4], "eth0", *host[5:]]
    return [host, inside]


@contextlib.contextmanager
def capped_links(nodes: list[str], rate: str, burst: str = "128kb"):
    """Cap each node's link at ``rate`` both ways (tbf, ``burst`` bytes of credit after idle
    time) for the ``with`` block; every qdisc put on is taken off on the way out, after an
    error or Ctrl-C too."""
    added: list[list[str]] = []
    try:
        for node in nodes:
            tbf = ("tbf", "rate", rate, "burst", burst, "latency", "50ms")
            for add, rm in zip(link_tc(node, "replace", *tbf), link_tc(node, "del"), strict=True):
                added.append(rm)
                subprocess.run(add, check=True, capture_output=True, text=True)
        yield
    finally:
        for rm in reversed(added):
            subprocess.run(rm, check=False, capture_output=True)


# ---- one run ----------------------------------------------------------------------------------
def ours_flags(name: str, args: argparse.Namespace) -> dict:
    hier = {"algo": "hier-avg", "group-size": args.group_size, "local-period": args.local_period}
    hier["global-period"] = args.period // args.local_period
    base = name.removesuffix("-rank")
    return {
        "hier-avg": hier,
        "hier-avg-nb": {**hier, "hier-mode": "nonblocking"},
        "none-spawn": {"algo": "none", "spawn-workers": True},
        "single": {"algo": "none"},
    }.get(name) or {
        "algo": base,
        "period": args.period if base in ("local-sgd", "local-async", "lasgd") else None,
        "budget": "rank" if name in RANKED else None,
    }


def job_cmd(args, name: str, variant: str, tmp: Path, out: Path) -> tuple[list[str], dict]:
    """The mpirun command line of one contender and its environment."""
    slow = variant == "slow"
    ranks = 1 if name == "single" else args.nodes or RANKS
    cmd = [h.mpirun_exe(args.mpirun), "-n", str(ranks), "--bind-to", "none"]
    threads = max(1, h.cores() // args.nodes) if args.nodes else 0  # 0: hpc_asgd's default
    if args.nodes:  # one rank per emulated node, started in it by the launch agent
        cmd += ["--hostfile", str(tmp / "hosts"), "--map-by", "node", "--prtemca"]
        cmd += ["plm_ssh_agent", str(h.ROOT / "scripts" / "node_agent.sh")]
    else:
        cmd.append("--oversubscribe")
    env = h.mpi_env()
    common = {"dataset": args.dataset, "data_dir": args.data_dir, "model": args.model,
              "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
              "epochs": args.epochs, "eval_every": args.eval_every, "seed": 0}  # fmt: skip
    if name in PEERS or name in PEER_SCRIPTS:
        opts = {**common, "period": args.period, "local_period": args.local_period}
        opts.update(getattr(args, "peer_opts", None) or {})  # outer.py's (DiLoCo's outer SGD)
        opts.update(group_size=args.group_size, threads=threads)
        opts.update(slow_rank=SLOW_RANK if slow else -1, slow_factor=SLOW_FACTOR if slow else 1.0)
        opts.update(delay_flags(args, variant))
        master = (tmp / "hosts").read_text().split()[0] if args.nodes else "127.0.0.1"
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            env["MASTER_ADDR"], env["MASTER_PORT"] = master, str(s.getsockname()[1])
        script = PEER_SCRIPTS.get(name, PEER_SCRIPT)
        return [*cmd, sys.executable, script, name, json.dumps(opts)], env
    flags = {k.replace("_", "-"): v for k, v in common.items()}
    flags.update(ours_flags(name, args), out=out, **{"threads-per-worker": threads or None})
    flags.update(getattr(args, "extra_flags", None) or {})  # outer.py's (--outer-*, --avg-dtype)
    if slow:
        flags.update({"slow-rank": SLOW_RANK, "slow-factor": SLOW_FACTOR})
    flags.update({k.replace("_", "-"): v for k, v in delay_flags(args, variant).items()})
    return [*cmd, *h.train_cmd(flags)], env


def delay_flags(args: argparse.Namespace, variant: str) -> dict:
    """``hpc-asgd train``'s delay fields for a variant (peers/ddp.py reads the same)."""
    if variant == "delay":
        return {"delay": args.delay}
    if variant == "pause":
        return {"pause_rank": SLOW_RANK, "pause_at": args.pause_at, "pause_s": args.pause_s}
    return {}


def read_ours(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    keep = ("steps_per_rank", "extra_steps", "samples_processed", "samples_per_s", "comm_wait_s",
            "comm_inflight_s", "comm_overlap", "averaging_rounds", "consensus", "comm", "wall_s",
            "final_test_acc", "hosts", "steps_taken", "budget_used", "averager_cpu_s",
            "worker_cpu_s")  # fmt: skip
    res = {k: s.get(k) for k in keep}
    res["train_s_per_rank"], res["setup_s"] = s["train_s"], s["setup_s"][0]
    res["rows"] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    return res


def launch(args: argparse.Namespace, name: str, variant: str, tmp: Path) -> dict:
    """One mpirun job of one contender; returns its figures (or an ``error``)."""
    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    cmd, env = job_cmd(args, name, variant, tmp, out)
    ranks = 1 if name == "single" else args.nodes or RANKS
    res: dict = {"load_before": os.getloadavg()[0], "command": shlex.join(cmd)}
    t0 = time.monotonic()
    proc = h.run_tree(cmd, args.run_timeout, env)  # its own session: killed whole on a timeout
    res["job_s"] = round(time.monotonic() - t0, 2)
    if proc is None:
        return {**res, "error": f"ran past --run-timeout {args.run_timeout} s"}
    if proc.returncode != 0:
        return {**res, "error": f"rc {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    try:  # a node taken down under the job (slurm_local.sh stop) can leave no summary
        peer = name in PEERS or name in PEER_SCRIPTS
        res.update(h.result_line(proc.stdout, PEER_MARK) if peer else read_ours(out))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {**res, "error": f"no result: {e!r} {proc.stdout[-2000:]}"}
    if args.keep_runs:  # for hpc-asgd report / predict --calibrate
        Path(args.keep_runs).mkdir(parents=True, exist_ok=True)
        shutil.move(out, Path(args.keep_runs) / f"{variant}-{out.name}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    if args.nodes and len(set(res.get("hosts") or [])) != ranks:
        return {**res, "error": f"ranks not one per node: {res.get('hosts')}"}
    tta, setup = time_to(res["rows"], args.target), res.get("setup_s")
    res["time_to_target_s"] = tta
    res["train_to_target_s"] = tta - setup if tta is not None and setup is not None else None
    train = res.get("train_s_per_rank")
    res["job_train_s"] = res["samples_processed"] / res["samples_per_s"]
    # each rank's own samples: they differ under the job budget (a fast rank takes more steps)
    extra = res.get("extra_steps") or [0] * ranks
    per_rank = [(res["steps_per_rank"] + x) * args.batch_size for x in extra]
    res["aggregate_samples_per_s"] = (
        sum(n / t for n, t in zip(per_rank, train, strict=True))
        if train and all(t > 0 for t in train)
        else None
    )
    res["wait_share"] = [w / res["job_train_s"] for w in res["comm_wait_s"]]
    return res


def time_to(rows: list[dict], target: float) -> float | None:
    return next((row["time_s"] for row in rows if row["test_acc"] >= target), None)


# ---- figures ----------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok)}
    for key in MEDIANS:
        vals = [v for v in (r.get(key) for r in ok) if v is not None]
        out[key] = h.median(vals)
        out[key + "_range"] = [min(vals), max(vals)] if vals else None
    out["reached_target"] = sum(r.get("time_to_target_s") is not None for r in ok)
    n = max((len(r["wait_share"]) for r in ok), default=0)
    out["wait_share"] = [h.median([r["wait_share"][i] for r in ok]) for i in range(n)]
    out["averaging_rounds"] = h.median([r.get("averaging_rounds") for r in ok])
    return out


def goals(report: dict) -> list[dict]:
    """The issue's goals as ratios of medians (and paired ratios) of two runs' figures; a goal
    whose contenders were not asked for (--contenders) is left out, not "missed"."""
    res, raw, a = report["results"], report["runs"], report["args"]

    def goal(text, num, den, key, op, threshold, note=""):
        keys = [f"{n}|{VARIANT.get(v, v)}" for n, v in (num, den)]
        value = h.ratio(*(res.get(k, {}).get(key) for k in keys))
        per_rep = [[None if "error" in r else r.get(key) for r in raw.get(k, [])] for k in keys]
        met = value is not None and OPS[op](value, threshold)
        return {"goal": text, "value": value, "paired": h.paired(*per_rep), "threshold": threshold,
                "met": met, "note": note, "needs": (num[0], den[0])}  # fmt: skip

    def r(num, den, key="samples_per_s", spec=".2f"):
        return h.fmt(h.ratio(*(res.get(f"{n}|{v}", {}).get(key) for n, v in (num, den))), spec)

    out = []
    for link in (v for v, _ in report["variants"] if a["nodes"] and v in LINKS[1:]):
        for algo in (*NONBLOCKING, "sync"):
            op, t = ("<", 0.5) if algo == "sync" else (">=", 0.8)
            text = f"{link}: {algo} keeps {op} {t} of its uncapped samples/s"
            out.append(goal(text, (algo, link), (algo, "uncapped"), "samples_per_s", op, t))
    if not a["nodes"]:  # the 2-rank goals compare runs that --nodes jobs do not have
        for algo in ("local-async", "lasgd", *RANKED):
            agg = r((algo, "slow"), ("sync", "slow"), "aggregate_samples_per_s")
            out.append(goal(
                f"2x straggler: {algo} samples/s >= 1.45x sync's (1.5x ideal)", (algo, True),
                ("sync", True), "samples_per_s", ">=", 1.45,
                f"aggregate (sum of per-rank rates) ratio: {agg}",
            ))  # fmt: skip
            out.append(goal(
                f"2x straggler: {algo} reaches test accuracy {a['target']} in <= 0.75x sync's "
                "training time", (algo, True), ("sync", True), "train_to_target_s", "<=", 0.75,
            ))  # fmt: skip
            if any(v == "delay" for v, _ in report["variants"]):
                out.append(goal(
                    f"random delays on every rank: {algo} samples/s >= 1.3x sync's",
                    (algo, "delay"), ("sync", "delay"), "samples_per_s", ">=", 1.3,
                ))  # fmt: skip
        note = "against none in the rank's own process: "
        note += r(("local-async", "even"), ("none", "even"), spec=".3f")
        la, ddp = ("local-async", False), ("torch-ddp", False)
        out += [
            goal("local-async loses <= 5 % samples/s against --algo none (same W = 1, spawned "
                 "worker: none-spawn)", la, ("none-spawn", False), "samples_per_s", ">=", 0.95,
                 note),
            goal("local-async samples/s >= 2.5x torch DDP's (2 ranks)", la, ddp, "samples_per_s",
                 ">=", 2.5),
            goal(f"local-async reaches test accuracy {a['target']} in <= 0.5x torch DDP's wall "
                 "time", la, ddp, "time_to_target_s", "<=", 0.5, "training time only (set-up "
                 f"excluded): {r((la[0], 'even'), (ddp[0], 'even'), 'train_to_target_s')}"),
        ]  # fmt: skip
    ran = set(report["contenders"])
    return [g for g in out if ran.issuperset(g.pop("needs"))]


def row(name: str, s: dict) -> list[str]:
    """A contender's cells in a variant's table (``summarise``'s medians)."""
    rng, f = s["samples_per_s_range"], h.fmt
    reach = f" ({s['reached_target']}/{s['runs_ok']} reached)"
    failed = f" ({s['runs_failed']} run(s) failed)" if s["runs_failed"] else ""
    return [
        name,
        f(s["samples_per_s"], ".0f") + (f" [{rng[0]:.0f}-{rng[1]:.0f}]" if rng else ""),
        f(s["aggregate_samples_per_s"], ".0f"),
        f(s["time_to_target_s"]) + (reach if s["reached_target"] < s["runs_ok"] else ""),
        f(s["train_to_target_s"]),
        f(s["setup_s"]),
        f(s["final_test_acc"], ".3f"),
        " / ".join(f(x) for x in s["wait_share"]),
        f(s["averaging_rounds"], ".0f"),
        f(s["others_cores"]) + failed,
    ]


def markdown(report: dict) -> str:
    a, n = report["args"], report["ranks"]
    where = f"{n} ranks under `mpirun --oversubscribe --bind-to none`, "
    if a["nodes"]:
        where = (
            f"{n} emulated nodes x 1 rank (`scripts/slurm_local.sh start --nodes {n}`: network "
            "namespaces on one bridge, sharing this machine's cores; `mpirun --hostfile` of the "
            "nodes `--map-by node`, launch agent `scripts/node_agent.sh`; ranks ran on "
            f"{', '.join(report['hosts'])}), "
        )
    title = "Compare: hpc_asgd synchronisers against torch DDP / post-local SGD / hierarchical "
    title += "averaging" + (f", {n} nodes with capped links" if a["nodes"] else "")
    lines = h.header(report, title)
    lines[-2] += f" Median load average before each run {h.fmt(report['load_median_runs'])}."
    lines += [
        where + f"{report['threads_per_rank']} torch thread(s) per rank (cores // ranks; "
        "local-async's worker gets the rank's thread, its main process averages). "
        f"Model `{a['model']}` on `{a['dataset']}` {report['input_shape']}, "
        f"batch {a['batch_size']} per rank, SGD lr {a['lr']} momentum {a['momentum']}, "
        f"{a['epochs']} epochs ({report['steps_per_rank']} steps per rank), evaluation every "
        f"{a['eval_every']} epoch, K = {a['period']}, K1 = {a['local_period']}, S = "
        f"{a['group_size']}. Medians of {a['repeats']} repeats, [min-max] below each where useful.",
        "",
    ]
    if a["nodes"]:  # the links, and why this cap
        best = max((r["samples_per_s"] or 0 for k, r in report["results"].items()
                    if "|uncapped" in k), default=0)  # fmt: skip
        step_ms = a["batch_size"] * n / best * 1e3 if best else None  # about the computation
        wire_ms = report["ring_bytes"] * 8e3 / rate_bits(a["cap"])
        lines += [
            f"Links: `tc qdisc replace dev hv-NODE root tbf rate {a['cap']} burst {a['burst']} "
            "latency 50ms` on the host's side and the same on the node's `eth0` (both "
            "directions), put on before each run and taken off after it; one-capped caps "
            f"{report['node_names'][-1]}, all-capped every node. Why {a['cap']}: one averaging "
            "round (and one step of sync) allreduces the flat buffer of "
            f"{report['round_bytes'] / 4:.0f} floats ({report['round_bytes'] / 1e6:.2f} MB); a "
            "ring allreduce sends 2(N-1)/N of it each way per rank, "
            f"{report['ring_bytes'] / 1e6:.2f} MB: at least {wire_ms:.0f} ms on the wire at "
            f"{a['cap']}, against {h.fmt(step_ms, '.1f')} ms per step of the fastest uncapped "
            "contender (about the computation alone). Sync waits for a round every step, so "
            "at this cap it is communication-bound, while the periodic averagers have K steps "
            f"({h.fmt(step_ms and step_ms * a['period'], '.0f')} ms) to hide one round (at "
            f"1gbit: {report['ring_bytes'] * 8e-6:.0f} ms). Model "
            f"`{a['model']}` on `{a['dataset']}`, not resnet20: a ResNet-20 step is far slower "
            f"on {report['nproc']} cores shared by {n} ranks, too slow for every (contender, "
            "link, repeat); its 0.27 M parameters would also leave more computation per byte "
            "averaged.",
            "",
        ]
    t = a["target"]
    cols = ["contender", "samples/s", "aggregate samples/s", f"wall to {t} (s)"]
    cols += [f"train to {t} (s)", "set-up (s)", "final acc"]
    cols += ["wait share " + " / ".join(f"r{i}" for i in range(n)), "rounds", "others' CPU (cores)"]
    for variant, title in report["variants"]:
        rows = [row(name, s) for name in report["contenders"]
                if (s := report["results"].get(f"{name}|{variant}")) is not None]  # fmt: skip
        lines += [f"## {title}", "", *h.table(cols, rows, "lr"), ""]
    links = [x for x, _ in report["variants"]] if a["nodes"] else []
    if links:
        head = [f"samples/s {x}" for x in links] + [f"{x} / uncapped" for x in links[1:]]
        head += [f"to {t} {x} (s)" for x in links]
        rows = []
        for name in report["contenders"]:
            r = [report["results"].get(f"{name}|{x}", {}) for x in links]
            sps = [x.get("samples_per_s") for x in r]
            cells = [h.fmt(x, ".0f") for x in sps] + [h.fmt(h.ratio(x, sps[0])) for x in sps[1:]]
            rows.append([name, *cells, *(h.fmt(x.get("time_to_target_s")) for x in r)])
        lines += ["## Capped / uncapped (ratios of medians)", ""]
        lines += [*h.table(["contender", *head], rows, "lr"), ""]
    goals = [
        [g["goal"], h.fmt(g["value"]) + (f" ({g['note']})" if g["note"] else ""),
         h.fmt(g["paired"]), "yes" if g["met"] else "no"]
        for g in report["goals"]
    ]  # fmt: skip
    lines += ["## Goals" + (" (the issue's hypothesis, tested)" if a["nodes"] else ""), ""]
    lines += h.table(["goal", "measured (ratio of medians)", "paired", "met"], goals, "lrrl")
    lines += ["", "## Contenders", ""]
    lines += h.table(["contender", "what runs"], [[n, WHAT[n]] for n in report["contenders"]], "l")
    lines += [
        "",
        "samples/s: all ranks' samples / the slowest rank's training time (summary.json's "
        "`samples_per_s`). aggregate: sum over ranks of each rank's samples / its own training "
        "time. wall to target: seconds from the start of the run (engine up) to the first "
        "evaluation at or above the target, set-up and evaluations included; train to target "
        "subtracts the set-up (data, model, DDP, spawning local-async's worker). wait share: "
        "seconds each rank spent blocked in the synchroniser's collectives (for the "
        "non-blocking ones: waiting for the other ranks to finish, and the final average) / the "
        "job's training time. others' CPU: CPU time the machine spent outside this run's "
        "processes during the run, per second (0 on a quiet machine). paired: the median over "
        "repeats of the per-repeat ratio.",
        "",
    ]
    return "\n".join(lines)


# ---- driver -----------------------------------------------------------------------------------
def emulated_nodes(args) -> tuple[list[str], list[tuple[str, str]]]:
    """The first N emulated nodes (rank r runs on nodes[r]) and the --links variants."""
    found = h.run_tree(["bash", "scripts/slurm_local.sh", "hostfile"], 60)
    nodes = [ln.split()[0] for ln in found.stdout.splitlines()][: args.nodes] if found else []
    if len(nodes) < args.nodes:
        sys.exit(f"compare.py: {args.nodes} emulated nodes needed, found {nodes}: run "
                 f"scripts/slurm_local.sh start --nodes {args.nodes} (as root)")  # fmt: skip
    shown = [h.run_tree(c, 10) for x in nodes for c in link_tc(x, "show")]
    if any(r is None or "tbf" in r.stdout for r in shown):  # left by a killed run
        sys.exit('compare.py: a tbf is on a node\'s link already, "uncapped" would be capped '
                 "(tc qdisc del dev hv-NODE root, and on its eth0):\n"
                 + "".join(r.stdout for r in shown if r))  # fmt: skip
    titles = {"uncapped": "Uncapped links", "all-capped": f"Every link capped at {args.cap}"}
    titles["one-capped"] = f"{nodes[-1]}'s link capped at {args.cap}"
    return nodes, [(x, titles[x]) for x in args.links]


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # through the jobs' (and links') cleanup
        signal.signal(sig, lambda *_: sys.exit(143))
    report = h.new_report("compare", argv, args)
    if report["load_before"] and report["load_before"][0] > args.max_load:
        print(f"  warning: load average {report['load_before'][0]:.2f} > {args.max_load}: "
              "other work is running, figures will be noisy", flush=True)  # fmt: skip
    from hpc_asgd.data import ShardSampler, load_dataset
    from hpc_asgd.models import build_model

    data = load_dataset(args.dataset, args.data_dir)
    ranks = args.nodes or RANKS
    spe = ShardSampler(len(data.train), 0, ranks, args.batch_size, 0).steps_per_epoch
    variants = [("even", "No straggler")] + [("slow", "Rank 1 slowed 2x")] * (not args.no_straggler)
    if args.delay:
        variants.append(("delay", f"Random delays after every step, every rank ({args.delay} ms)"))
    if args.pause_at:
        title = f"Rank {SLOW_RANK} pauses {args.pause_s:g} s once, after node step {args.pause_at}"
        variants.append(("pause", title))
    nodes: list[str] = []
    if args.nodes:
        nodes, variants = emulated_nodes(args)
    capped = {"one-capped": nodes[-1:], "all-capped": nodes}
    pairs = [
        (n, x)
        for x, _ in variants
        for n in args.contenders
        if x not in NO_BASELINES or n not in BASELINES
    ]
    runs: dict[str, list[dict]] = {f"{n}|{x}": [] for n, x in pairs}
    # each node has its own /tmp: the run folders of --nodes live where every node sees them
    tmp = Path(tempfile.mkdtemp(prefix="hpc_asgd_compare_", dir="/var/tmp" if nodes else None))
    (tmp / "hosts").write_text("".join(f"{x} slots=1\n" for x in nodes))

    def launch_on(name: str, variant: str) -> dict:  # with the variant's links capped
        try:
            with capped_links(capped.get(variant, []), args.cap, args.burst):
                return launch(args, name, variant, tmp)
        except subprocess.CalledProcessError as e:  # a link gone: the cluster was restarted
            return {"error": f"{shlex.join(e.cmd)}: {e.stderr.strip()}"}

    try:
        for rep in range(args.repeats):
            for name, variant in h.rotated(pairs, rep * 3):
                key = f"{name}|{variant}"
                res = h.quietest(
                    lambda n=name, v=variant: launch_on(n, v),
                    args.retry_noisy, args.max_others, args.wait_quiet, f"[{rep}] {key}",
                    "others_cores",
                )  # fmt: skip
                res["repeat"] = rep
                runs[key].append(res)
                if "error" in res:
                    print(f"  [{rep}] {key}: FAILED {res['error'][:400]}", flush=True)
                    continue
                print(f"  [{rep}] {key}: {res['samples_per_s']:.0f} samples/s, to target "
                      f"{h.fmt(res['time_to_target_s'])} s, acc {res['final_test_acc']:.3f}, job "
                      f"{res['job_s']:.1f} s, load {res['load_before']:.2f}, others "
                      f"{res['others_cores']:.2f} cores", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model = build_model(args.model, data.input_shape, data.num_classes)
    tensors = [*model.parameters(), *model.buffers()]
    floats = sum(t.numel() for t in tensors if t.is_floating_point())
    report.update(
        ranks=ranks,
        node_names=nodes,
        hosts=sorted({x for rs in runs.values() for r in rs for x in r.get("hosts") or []}),
        variants=variants,
        round_bytes=4 * floats,  # float32, the flat buffer every averaging round reduces
        ring_bytes=4 * floats * 2 * (ranks - 1) / ranks,  # each way per rank, ring
        threads_per_rank=max(1, h.cores() // ranks),
        input_shape=list(data.input_shape),
        steps_per_rank=max(1, math.ceil(args.epochs * spe)),
        contenders=list(args.contenders),
        load_median_runs=h.median([r.get("load_before") for rs in runs.values() for r in rs]),
        runs=runs,
        results={key: summarise(rs) for key, rs in runs.items()},
    )
    report["goals"] = goals(report)
    h.write_report(report, markdown, args.stem, mpi=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--contenders", nargs="+", choices=(*CONTENDERS, *RANKED),
        help="default: all but the -rank ones; with --nodes: " + " ".join(NODE_CONTENDERS),
    )  # fmt: skip
    nodes = "N > 1: one rank per emulated node (slurm_local.sh), --links for the straggler"
    h.options(p, ("--nodes", 0, nodes + " (root only)"))
    p.add_argument("--links", nargs="+", choices=LINKS, default=list(LINKS), help="with --nodes")
    h.options(
        p,
        ("--cap", "100mbit", "tc rate of a capped link (with --nodes): sync is bound by it"),
        ("--burst", "128kb", "tbf's burst: what a capped link sends at full speed after idling"),
        ("--group-size", 0, "S: ranks per hier-avg group (and torch-hier's); 0: 1, or N / 2"),
        ("--repeats", 3),
        ("--epochs", 16.0, "passes over each rank's shard"),
        ("--quick", False, "smoke run: 1 repeat of 3 epochs"),
        ("--no-straggler", False, "skip the 2x-straggler runs"),
        (
            "--delay",
            "",
            "also run every contender with random delays after each step on every "
            "rank and worker: exp:MEAN_MS or lognormal:MEAN_MS[:SIGMA] (hpc-asgd train --delay)",
        ),
        (
            "--pause-at",
            0,
            f"also run every contender (but the baselines) with rank {SLOW_RANK} "
            "pausing once, after this node step (1-based; hpc-asgd train --pause-at)",
        ),
        ("--pause-s", 1.0, "the pause's length in seconds"),
        ("--target", 0.90, "test accuracy to time"),
        ("--dataset", "digits", "digits (default) or mnist with --data-dir"),
        ("--data-dir", None),
        ("--model", "cnn"),
        ("--batch-size", 16, "per rank"),
        ("--lr", 0.02),
        ("--momentum", 0.9),
        ("--eval-every", 0.5, "epochs between evaluations"),
        ("--period", 8, "K: steps between model averages"),
        ("--local-period", 2, "K1 of hier-avg / torch-hier"),
        ("--max-load", 1.5, "warn above this load average"),
        ("--max-others", 0.25, "cores other processes may take during a run before it is noisy"),
        ("--wait-quiet", 0.0, "before each run, wait up to this many seconds for --max-others"),
        ("--retry-noisy", 0, "repeat a noisy run up to N times, keep the quietest"),
        h.OUT,
        ("--stem", "compare", "output files <out>/<stem>.json and .md"),
        ("--keep-runs", None, "keep each run's folder here, named VARIANT-CONTENDER-ID"),
        h.MPIRUN,
        ("--run-timeout", 300.0, "seconds per mpirun job"),
    )
    args = p.parse_args(argv)
    args.keep_runs = str(Path(args.keep_runs).resolve()) if args.keep_runs else None
    if args.quick:
        args.repeats, args.epochs = 1, 3.0
    if args.repeats < 1 or args.epochs <= 0:
        p.error("--repeats >= 1 and --epochs > 0")
    if args.period % args.local_period:
        p.error("--local-period must divide --period")
    args.contenders = args.contenders or list(NODE_CONTENDERS if args.nodes else CONTENDERS)
    args.links = sorted(set(args.links), key=LINKS.index)  # uncapped first: the ratios' base
    args.group_size = args.group_size or max(1, args.nodes // 2)
    try:
        parse_delay(args.delay)
    except ConfigError as e:
        p.error(f"--{e}")
    if args.pause_at < 0 or (args.pause_at and not args.pause_s > 0):
        p.error("--pause-at must be >= 0, and --pause-s > 0 with it")
    if args.nodes and (args.delay or args.pause_at):
        p.error("--delay and --pause-at: not with --nodes (its variants are the links)")
    if args.nodes == 1 or (args.nodes and args.links[0] != "uncapped"):
        p.error("--nodes N needs N > 1 and the uncapped links among --links")
    if (args.nodes or RANKS) % args.group_size:
        p.error("--group-size must divide the number of ranks")
    try:
        rate_bits(args.cap)
    except ValueError as e:
        p.error(f"--cap: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return driver(parse(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
