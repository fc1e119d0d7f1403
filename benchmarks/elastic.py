"""A rank killed at a third of the job: ``--min-ranks`` (shrink and continue) against today's
path (the job ends, is restarted and resumes from its last checkpoint), and against no failure.

Each repeat runs, for each algorithm, the same ``mpirun -n R`` training command three ways:

- ``none``: no failure: the reference time and node-step rate;
- ``elastic``: rank R-1 is sent SIGKILL (from outside, as the OOM killer does it) once the job's
  metrics show a third of its epochs; ``--min-ranks R-1`` (and ``--with-ft ulfm``) lets the
  survivors go on;
- ``requeue``: the same kill without ``--min-ranks``: the job ends; it is started again with
  ``--resume auto`` (no queue wait here: on a cluster add the wait) and resumes from the last
  checkpoint, written every quarter of the ``none`` run's training time
  (``--checkpoint-frac``; the issue's 60 s for a 4-minute job). Its time is the two runs' sum.

- ``join`` (the blocking algorithms, local-sgd here): the elastic run with ``--max-ranks R``:
  the survivors start a replacement (``MPI_Comm_spawn``), which joins from rank 0 and trains
  to the end with them; its figure is ``join_s`` (from the spawn to training again: the
  replacement's start-up, data, model and hand-over; issue goal <= 10 s on digits / cnn).

Figures (medians of ``--repeats``): kill to training again on the survivors (the membership
row's ``resumed_unix`` minus the kill's time), the survivors' node steps/s after the loss over
the ``none`` run's (issue goal: samples/s >= 0.95 x 3/4 of the full job's, i.e. this ratio
>= 0.95), and the whole job's time elastic / requeue (goal <= 0.6).

    python benchmarks/elastic.py --repeats 3
    python benchmarks/elastic.py --algos local-sgd --model cnn --epochs 40 --stem elastic_join_cnn
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h

MARK = "elastic-result: "
JOINABLE = ("local-sgd", "hier-avg", "sync", "none")  # hpc_asgd.joiners.JOINABLE


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    h.options(
        p,
        ("--ranks", 4, "ranks of the job (rank R-1 is killed)"),
        ("--algos", "lasgd,local-sgd"),
        ("--dataset", "digits"),
        ("--model", "mlp"),
        ("--epochs", 120, "the job's length (about 40 s at 4 ranks on 2 cores)"),
        ("--period", 4),
        ("--kill-at", 1 / 3, "fraction of the epochs after which the rank is killed"),
        ("--checkpoint-frac", 0.25, "requeue: checkpoint interval, a fraction of the none run"),
        ("--repeats", 3),
        ("--timeout", 600.0),
        ("--mpirun", None),
        ("--out", "benchmarks/results"),
        ("--stem", "elastic"),
    )
    return p.parse_args(argv)


def _ranks_of(session: int) -> dict[int, int]:
    """{MPI rank: pid} of the job's training processes (in the mpirun's session)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != session:
                continue
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if b"hpc_asgd.cli" not in cmd:
            continue
        for kv in env:
            if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(kv.split(b"=", 1)[1])] = int(d.name)
    return found


def _epochs_done(out: Path) -> float:
    try:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    except (OSError, ValueError):
        return 0.0
    return max((float(r.get("epoch", 0)) for r in rows), default=0.0)


def _run(
    args, algo: str, out: Path, kill: bool, min_ranks: bool, resume: bool, ckpt_s: float = 0,
    join: bool = False,
) -> dict:  # fmt: skip
    """One mpirun; returns its wall time, rc, the kill's time and the summary (if any)."""
    flags = {
        "dataset": args.dataset, "model": args.model, "epochs": args.epochs, "algo": algo,
        "period": args.period, "eval-every": max(1, args.epochs // 12), "comm-timeout": 60,
        "out": out, "no-verify": True,
        "min-ranks": args.ranks - 1 if min_ranks else None,
        "max-ranks": args.ranks if join else None,
        "checkpoint-minutes": ckpt_s / 60 if ckpt_s else None,
        "checkpoint-dir": out / "checkpoints" if ckpt_s else None,
        "resume": "auto" if resume else None,
    }  # fmt: skip
    cmd = [h.mpirun_exe(args.mpirun), "-n", str(args.ranks), "--oversubscribe", "--bind-to"]
    # ULFM only where it is used: the other runs are today's default path
    cmd += ["none", *(["--with-ft", "ulfm"] if min_ranks else []), *h.train_cmd(flags)]
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=h.mpi_env(),
        cwd=h.ROOT, start_new_session=True,
    )  # fmt: skip
    killed_at = None
    try:
        while kill and proc.poll() is None:
            if _epochs_done(out) >= args.kill_at * args.epochs:
                pid = _ranks_of(proc.pid).get(args.ranks - 1)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.time()
                    break
            time.sleep(0.05)
        text, _ = proc.communicate(timeout=args.timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the job's left-overs, if any
            os.killpg(proc.pid, signal.SIGKILL)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else None
    if kill and killed_at is None:
        sys.exit(f"elastic.py: the job ended before rank {args.ranks - 1} could be killed")
    if summary is None and not (kill and not min_ranks):
        sys.exit(f"elastic.py: {' '.join(map(str, cmd))} failed (rc {proc.returncode})\n{text}")
    return {"wall_s": time.time() - t0, "rc": proc.returncode, "killed_at": killed_at,
            "summary": summary, "text": text}  # fmt: skip


def one(args, algo: str, tmp: Path, rep: int) -> dict:
    base = _run(args, algo, tmp / f"{algo}-{rep}-none", False, False, False)
    s0 = base["summary"]
    rate0 = s0["steps_per_rank"] / max(s0["train_s"])  # node steps/s with every rank
    el = _run(args, algo, tmp / f"{algo}-{rep}-elastic", True, True, False)
    s = el["summary"]
    [m] = s["membership"]
    after_s = s["wall_s"] - m["time_s"]
    rate1 = (s["steps_per_rank"] - m["node_step"]) / after_s
    rq_out = tmp / f"{algo}-{rep}-requeue"
    ckpt_s = args.checkpoint_frac * max(s0["train_s"])
    first = _run(args, algo, rq_out, True, False, False, ckpt_s)
    second = _run(args, algo, rq_out, False, False, True, ckpt_s)
    resumed = [ln for ln in second["text"].splitlines() if "resuming" in ln]
    joined = {}
    if algo in JOINABLE:
        jn = _run(args, algo, tmp / f"{algo}-{rep}-join", True, True, False, join=True)
        sj = jn["summary"]
        row = sj["membership"][-1]  # the replacement's row, after the loss's
        joined = {
            "join_s": row["join_s"],
            "join_kill_to_training_s": row["resumed_unix"] - jn["killed_at"],
            "join_wall_s": jn["wall_s"],
            "join_world": sj["world_size"],
            "join_consensus": sj["consensus"],
            "join_acc": sj["final_test_acc"],
        }
    return {
        **joined,
        "none_s": base["wall_s"],
        "none_train_s": max(s0["train_s"]),
        "elastic_s": el["wall_s"],
        "requeue_s": first["wall_s"] + second["wall_s"],
        "requeue_first_s": first["wall_s"],
        "kill_to_training_s": m["resumed_unix"] - el["killed_at"],
        "recovery_s": m["recovery_s"],
        "rate_ratio": rate1 / rate0,
        "killed_at_step": m["node_step"],
        "steps_lost": m["steps_lost"],
        "credited_steps": m["credited_steps"],
        "elastic_acc": s["final_test_acc"],
        "none_acc": s0["final_test_acc"],
        "requeue_acc": second["summary"]["final_test_acc"],
        "elastic_consensus": s["consensus"],
        "resumed": resumed,
        "checkpoint_s": ckpt_s,
    }


def markdown(report: dict) -> str:
    a = report["args"]
    lines = h.header(report, "A rank lost at a third of the job: shrink and continue vs requeue")
    lines += [
        f"{a['ranks']} ranks (`mpirun`; `--with-ft ulfm` for the elastic run), oversubscribed "
        f"on {report['cores_usable']} cores, {a['dataset']} / {a['model']}, {a['epochs']} epochs, "
        f"K = {a['period']}; rank {a['ranks'] - 1} sent SIGKILL after {a['kill_at']:.2f} of the "
        f"epochs. Requeue: checkpoint every {a['checkpoint_frac']:g} of the no-failure run's "
        f"training time, restarted at once with `--resume auto` (no queue wait). Medians of "
        f"{a['repeats']} repeats.",
        "",
    ]
    rows = []
    for algo, res in report["results"].items():
        med = {k: h.median([r[k] for r in res]) for k in res[0] if k != "resumed"}
        # per repeat: the checkpoint the requeued run resumed from ("start": none yet)
        resumed = [r["resumed"][0].split("node step")[1].split()[0] if r["resumed"] else "start"
                   for r in res]  # fmt: skip
        rows.append(
            [
                algo,
                f"{h.fmt(med['killed_at_step'], '.0f')} / {', '.join(resumed) or 'start'}",
                h.fmt(med["kill_to_training_s"], ".2f"),
                h.fmt(med["recovery_s"], ".3f"),
                h.fmt(med["rate_ratio"], ".2f"),
                f"{h.fmt(med['none_s'], '.1f')} ({h.fmt(med['none_train_s'], '.1f')})",
                h.fmt(med["elastic_s"], ".1f"),
                h.fmt(med["requeue_s"], ".1f"),
                h.fmt(h.paired([r["elastic_s"] for r in res], [r["requeue_s"] for r in res])),
                f"{h.fmt(med['elastic_acc'], '.3f')} / {h.fmt(med['requeue_acc'], '.3f')} / "
                f"{h.fmt(med['none_acc'], '.3f')}",
            ]
        )
    head = ["algo", "elastic lost rank at / requeue resumed from, per repeat (node step)",
            "kill to training (s)",
            "recovery (s)", "survivors' step rate / full",
            "no failure (s; of it training)", "elastic (s)", "requeue (s)", "elastic / requeue",
            "accuracy elastic / requeue / none"]  # fmt: skip
    lines += h.table(head, rows, "lr")
    joins = []
    for algo, res in report["results"].items():
        if "join_s" not in res[0]:
            continue
        med = {k: h.median([r[k] for r in res]) for k in res[0] if k.startswith("join_")}
        joins.append(
            [
                algo,
                h.fmt(med["join_s"], ".2f"),
                h.fmt(med["join_kill_to_training_s"], ".2f"),
                h.fmt(med["join_wall_s"], ".1f"),
                f"{int(med['join_world'])}, {all(r['join_consensus'] for r in res)}",
                h.fmt(med["join_acc"], ".3f"),
            ]
        )
    if joins:
        lines += [
            "",
            f"With a replacement (`--max-ranks {a['ranks']}`): the survivors spawn one, which "
            "joins from rank 0 and trains to the end.",
            "",
        ]
        head = ["algo", "spawn to training (s)", "kill to training, 4 ranks again (s)",
                "job (s)", "ranks at the end, consensus", "accuracy"]  # fmt: skip
        lines += h.table(head, joins, "lr")
    lines += [
        "",
        "Kill to training: from the SIGKILL to the survivors' first step after the recovery "
        "round (ULFM's detection, revoke, shrink, the survivors' average). Step rate: the "
        "survivors' node steps/s after the loss over the no-failure run's; on oversubscribed "
        "cores the survivors get the dead rank's core share, so it exceeds 1 here and says "
        "nothing of a cluster's ranks, which each keep their own node.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = _args(argv)
    report = h.new_report("elastic", argv, args)
    results: dict[str, list[dict]] = {a: [] for a in args.algos.split(",")}
    with tempfile.TemporaryDirectory(prefix="hpc_asgd-elastic-") as tmp:
        for rep in range(args.repeats):
            for algo in h.rotated(list(results), rep):
                res = one(args, algo, Path(tmp), rep)
                results[algo].append(res)
                line = (
                    f"kill->training {res['kill_to_training_s']:.2f} s, elastic "
                    f"{res['elastic_s']:.1f} s, requeue {res['requeue_s']:.1f} s, none "
                    f"{res['none_s']:.1f} s, rate {res['rate_ratio']:.2f}"
                )
                print(f"  repeat {rep + 1}/{args.repeats} {algo}: {line}", flush=True)
    report["results"] = results
    h.write_report(report, markdown, args.stem, mpi=True)


if __name__ == "__main__":
    main(sys.argv[1:])
