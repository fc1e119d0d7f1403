"""Train one model on 2 MPI ranks with every hpc_asgd synchroniser and with torch's own
data-parallel tools; compare samples/s, time to a target accuracy, final accuracy and the
share of time spent blocked in communication, with and without a 2x straggler.

Contenders, all in one invocation, same model (``build_model(--model)``, seed 0), data (the
same ``ShardSampler`` shards and batch order), batch per rank, SGD (lr, momentum private to
each rank), evaluation schedule and core budget (2 ranks, ``cores // 2`` torch threads each):

  ours (``python -m hpc_asgd.cli train ...`` under mpirun; engine ``auto`` = mpi):
    sync          --algo sync: one allreduce of the flat gradient every step (in process)
    local-sgd     --algo local-sgd --period K (blocking K-AVG, in process)
    local-async   --algo local-async --period K (W = 1 spawned worker per rank trains while
                  the rank's main process averages in place, non-blocking)
    lasgd         --algo lasgd --period K (asynchronous allreduce of the model, in process)
    hier-avg      --algo hier-avg --group-size 1 --local-period K1 --global-period K/K1
    hier-avg-nb   the same with --hier-mode nonblocking
    local-async-keep, lasgd-keep
                  the same with --keep-training: a rank that has taken its steps keeps
                  training while the other finishes (the job's samples count every step)
    none          --algo none (no averaging, in process): an upper bound
    none-spawn    --algo none --spawn-workers: the same process layout as local-async (W = 1
                  spawned worker), the reference of the "<= 5 % loss" goal
    single        one process alone (mpirun -n 1, all cores' threads, --algo none): the
                  issue's "DDP is slower than one process" reference (not straggled)
  peers (written here, torch.distributed Gloo, launched by the same mpirun):
    torch-ddp        DistributedDataParallel + torch.optim.SGD
    torch-postlocal  DDP + post_localSGD_hook(PostLocalSGDState(start_localSGD_iter=0,
                     post_local_gradient_allreduce=False)) + PostLocalSGDOptimizer(SGD,
                     PeriodicModelAverager(period=K, warmup_steps=0))
    torch-hier       DDP + the same hook + SGD, then HierarchicalModelAverager(
                     OrderedDict([(K1, 1), (K, 2)]), warmup_steps=0).average_parameters(...)
                     after every optimizer step

With 2 ranks each rank stands for one node: hier-avg's groups (and torch-hier's first level)
are single ranks, whose averages are no-ops, and the global level averages every K steps.
torch's post-local hook would by default keep allreducing gradients inside the node's
subgroup, which on one machine is the whole world (DDP plus model averaging); the benchmark
turns that off (``post_local_gradient_allreduce=False``), which is local SGD across "nodes".

Each contender runs as is and once more with rank 1 slowed 2x (ours: ``--slow-rank 1
--slow-factor 2``; peers: the same rule, rank 1 sleeps (F - 1) x the measured step time after
every step). A repeat runs every (contender, straggler) pair once, in an order rotated each
repeat; every run is a fresh ``mpirun`` job. Figures are medians over ``--repeats``.

Per run:
  samples/s        samples processed by all ranks / the slowest rank's training time (ours:
                   summary.json's ``samples_per_s``; peers: the same definition); training
                   time excludes evaluations where they block the rank
  aggregate        sum over ranks of (the rank's samples / its own training time): what the
                   ranks processed while they trained. Equals samples/s when ranks move in
                   lockstep; exceeds it when a fast rank finishes early and then waits
  wall to target   seconds from the start of the run (after the engine / process group is
                   up: ``hpc_asgd.train.run``'s clock; peers: the same point) to the first
                   evaluation at or above ``--target``, evaluations and set-up included
  set-up           seconds from that start to the first training step (data, model, DDP,
                   spawning local-async's worker); "train to target" = wall to target - set-up
  wait share       per rank: seconds blocked in the synchroniser's collectives (ours:
                   summary.json's ``comm_wait_s``, which includes waiting for the other ranks
                   to finish and the final average; peers: seconds in DDP's gradient allreduce,
                   from launch to completion, measured by wrapping DDP's default allreduce
                   hook, or in ``average_parameters`` calls, and the final average) / the job's
                   training time

Ours runs through ``benchmarks/compare.py --ours-rank``, which calls ``hpc_asgd.cli.main``
unchanged after wrapping ``hpc_asgd.train.run``, ``_train_in_process``, ``_train_workers``
and ``WorkerPool.wait_ready`` with timers (each rank's own training time and set-up, which
summary.json does not break down per rank). If these names move, those columns are empty.

Slow links (``--nodes N``, the issue "Many nodes on one machine"): N emulated nodes of
``scripts/slurm_local.sh start --nodes N`` (network namespaces on one bridge, sharing this
machine's cores) x 1 rank, placed one per node by ``mpirun --hostfile`` (the nodes) ``--map-by
node`` with the launch agent ``scripts/node_agent.sh``; ``cores // N`` torch threads per rank.
Instead of the straggler, each contender runs once per ``--links`` setting: uncapped, the last
node's link capped at ``--cap`` (tc tbf, both ways), every link capped; hier-avg in groups of
``--group-size`` nodes (default N / 2). The capped / uncapped samples/s ratios test the
hypothesis: non-blocking averaging keeps >= 0.8 of its uncapped rate, sync falls below 0.5.
Root only (tc, nsenter); run files live under /var/tmp, since each node has its own /tmp.

Outputs: ``<out>/compare.json`` (every run's raw numbers, medians, goals, commands, versions,
host, load averages) and ``<out>/compare.md`` (tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    Foreign,
    capped_links,
    cores,
    link_tc,
    mpi_env,
    mpirun_exe,
    rate_bits,
    run_tree,
    versions,
    wait_idle,
)

OURS = ("sync", "local-sgd", "local-async", "lasgd", "hier-avg", "hier-avg-nb")
KEEPING = ("local-async-keep", "lasgd-keep")  # not run unless named in --contenders
BASELINES = ("none", "none-spawn", "single")
PEERS = ("torch-ddp", "torch-postlocal", "torch-hier")
CONTENDERS = (*OURS, *BASELINES, *PEERS)
CHOICES = (*CONTENDERS, *KEEPING)
RANKS = 2
SLOW_RANK, SLOW_FACTOR = 1, 2.0
PEER_MARK = "COMPARE_PEER_JSON "
VARIANT = {False: "even", True: "slow"}  # a run's key: contender|variant
LINKS = ("uncapped", "one-capped", "all-capped")  # --nodes: the link settings
NODE_CONTENDERS = ("sync", "local-sgd", "local-async", "lasgd", "hier-avg", "torch-ddp")
NONBLOCKING = ("local-async", "lasgd", "hier-avg-nb", *KEEPING)


# ---- shared helpers ------------------------------------------------------------------------
def eval_steps(total: int, spe: int, eval_every: float) -> list[int]:
    """The node steps after which to evaluate: as ``hpc_asgd.train.run`` chooses them."""
    every = max(1, round(eval_every * spe))
    return [*range(every, total, every), total]


def time_to(rows: list[dict], target: float) -> float | None:
    for row in rows:
        if row["test_acc"] >= target:
            return row["time_s"]
    return None


def median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ---- ours: one rank of the CLI, with timers -----------------------------------------------
def ours_rank(probe_dir: str, cli_args: list[str]) -> int:
    """``hpc_asgd.cli.main(cli_args)`` with timers around the training functions; each rank
    writes ``probe-<rank>.json`` (its own training time, set-up) into ``probe_dir``."""
    from hpc_asgd import cli

    rec: dict = {}
    try:
        import hpc_asgd.train as train_mod
        from hpc_asgd.workers import WorkerPool

        orig_run = train_mod.run

        def run(cfg, launch, comm=None):
            rec["t_run"] = time.perf_counter()
            rec["rank"] = launch.rank
            out = orig_run(cfg, launch, comm)
            Path(probe_dir, f"probe-{launch.rank}.json").write_text(json.dumps(rec))
            return out

        def timed(fn, start_key):
            def wrapper(*a, **kw):
                if start_key:
                    rec["t_train0"] = time.perf_counter()
                rec["train_s"] = fn(*a, **kw)
                return rec["train_s"]

            return wrapper

        orig_ready = WorkerPool.wait_ready

        def wait_ready(self):
            orig_ready(self)
            rec["t_train0"] = time.perf_counter()  # workers may step from here on

        train_mod.run = run
        train_mod._train_in_process = timed(train_mod._train_in_process, True)
        train_mod._train_workers = timed(train_mod._train_workers, False)
        WorkerPool.wait_ready = wait_ready
    except (ImportError, AttributeError) as e:  # the names moved: run without the timers
        print(f"compare.py: timers not installed ({e})", file=sys.stderr)
    return cli.main(cli_args)


# ---- peers: torch.distributed (Gloo) scripts ---------------------------------------------
def peer_rank(name: str, opts: dict) -> int:
    """One rank of a peer job. Rank and size from Open MPI's variables, rendezvous from
    MASTER_ADDR / MASTER_PORT (set by the driver), as a user's mpirun script would do."""
    from collections import OrderedDict

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.distributed.algorithms.model_averaging import averagers
    from torch.distributed.algorithms.model_averaging import utils as avg_utils
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager,
    )
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from hpc_asgd.data import ShardSampler, load_dataset
    from hpc_asgd.models import build_model

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
    torch.set_num_threads(opts["threads"] or max(1, cores() // local))  # as hpc_asgd's ranks
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    t_start = time.perf_counter()  # as hpc_asgd.train.run's clock: the engine is up

    data = load_dataset(opts["dataset"], opts["data_dir"])
    torch.manual_seed(opts["seed"])
    model = build_model(opts["model"], data.input_shape, data.num_classes)
    comm_s = [0.0]

    def timed_allreduce(state, bucket):  # DDP's default hook, timed launch -> completion
        t0 = time.perf_counter()

        def done(fut):
            comm_s[0] += time.perf_counter() - t0
            return fut.value()

        return allreduce_hook(state, bucket).then(done)

    def timed_call(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                comm_s[0] += time.perf_counter() - t0

        return wrapper

    net = DistributedDataParallel(model)  # broadcasts rank 0's parameters
    k, k1 = opts["period"], opts["local_period"]
    sgd = torch.optim.SGD(net.parameters(), lr=opts["lr"], momentum=opts["momentum"])
    averager = None
    if name == "torch-ddp":
        net.register_comm_hook(None, timed_allreduce)
        opt = sgd
    else:
        state = PostLocalSGDState(
            process_group=None,
            subgroup=None,
            start_localSGD_iter=0,
            post_local_gradient_allreduce=False,  # no intra-"node" gradient allreduce
        )
        net.register_comm_hook(state, post_localSGD_hook)
        if name == "torch-postlocal":
            avg = averagers.PeriodicModelAverager(period=k, warmup_steps=0)
            avg.average_parameters = timed_call(avg.average_parameters)
            opt = PostLocalSGDOptimizer(optim=sgd, averager=avg)
        else:  # torch-hier: groups of S ranks every K1 steps, everyone every K steps
            averager = HierarchicalModelAverager(
                period_group_size_dict=OrderedDict([(k1, opts["group_size"]), (k, world)]),
                warmup_steps=0,
            )
            averager.average_parameters = timed_call(averager.average_parameters)
            opt = sgd

    batch = opts["batch_size"]
    sampler = ShardSampler(len(data.train), rank, world, batch, opts["seed"])
    spe = sampler.steps_per_epoch
    total = max(1, math.ceil(opts["epochs"] * spe))
    pending = eval_steps(total, spe, opts["eval_every"])
    gen = torch.Generator().manual_seed(opts["seed"] * 7919 + rank)
    slow = opts["slow_factor"] if rank == opts["slow_rank"] else 1.0
    test = ShardSampler(len(data.test), rank, world, 512, 0, shuffle=False, drop_last=False)
    rows: list[dict] = []
    seen = [0.0, 0]  # train-loss sum and steps since the last evaluation
    loss_sum = 0.0

    def evaluate(step: int, module: torch.nn.Module) -> None:
        acc = torch.zeros(5, dtype=torch.float64)
        module.eval()
        with torch.no_grad():
            for idx in test.epoch(0):
                x, y = data.test.batch(idx, train=False)
                out = module(x)
                acc[0] += (out.argmax(1) == y).sum().item()
                acc[1] += F.cross_entropy(out, y, reduction="sum").item()
                acc[2] += y.numel()
        module.train()
        acc[3], acc[4] = loss_sum - seen[0], step - seen[1]
        seen[0], seen[1] = loss_sum, step
        dist.all_reduce(acc)
        rows.append(
            {
                "epoch": round(step / spe, 4),
                "time_s": round(time.perf_counter() - t_start, 3),
                "samples": step * batch * world,
                "train_loss": float(acc[3] / max(float(acc[4]), 1.0)),
                "test_acc": float(acc[0] / acc[2]),
                "test_loss": float(acc[1] / acc[2]),
            }
        )

    net.train()
    dist.barrier()
    t_train0 = t_seg = time.perf_counter()
    train_s = 0.0
    batches: list = []
    for s in range(total):
        t0 = time.perf_counter()
        e, i = divmod(s, spe)
        if i == 0:
            batches = sampler.epoch(e)
        x, y = data.train.batch(batches[i], train=True, gen=gen)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().item()
        if slow > 1:  # straggler: sleep in proportion to the measured step time
            time.sleep((slow - 1) * (time.perf_counter() - t0))
        if averager is not None:
            averager.average_parameters(net.parameters())
        if s + 1 == pending[0]:
            train_s += time.perf_counter() - t_seg
            if s + 1 == total and name != "torch-ddp":  # a consensus model, as ours ends
                timed_call(avg_utils.average_parameters)(iter(net.parameters()), None)
            evaluate(pending.pop(0), net.module)
            t_seg = time.perf_counter()

    mine = torch.tensor([train_s, comm_s[0], t_train0 - t_start], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if rank == 0:
        per_rank = [t.tolist() for t in every]
        train = [r[0] for r in per_rank]
        samples = total * batch * world
        out = {
            "steps_per_rank": total,
            "samples_processed": samples,
            "samples_per_s": samples / max(train),
            "train_s_per_rank": train,
            "comm_wait_s": [r[1] for r in per_rank],
            "setup_s": per_rank[0][2],
            "wall_s": time.perf_counter() - t_start,
            "final_test_acc": rows[-1]["test_acc"],
            "rows": rows,
            "torch_threads": torch.get_num_threads(),
            "hosts": hosts,
        }
        print(PEER_MARK + json.dumps(out), flush=True)
    # The all_gather was the last collective. Leave without destructors: torch 2.13 can
    # deadlock tearing down DDP's reducer (its Gloo thread waits for the GIL that the
    # joining main thread holds); it hung a straggler run of torch-ddp here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- driver ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_flags(name: str, args: argparse.Namespace) -> list[str]:
    k, k1 = str(args.period), str(args.local_period)
    hier = ["--algo", "hier-avg", "--group-size", str(args.group_size), "--local-period", k1]
    hier += ["--global-period", str(args.period // args.local_period)]
    return {
        "sync": ["--algo", "sync"],
        "local-sgd": ["--algo", "local-sgd", "--period", k],
        "local-async": ["--algo", "local-async", "--period", k],
        "lasgd": ["--algo", "lasgd", "--period", k],
        "hier-avg": hier,
        "hier-avg-nb": [*hier, "--hier-mode", "nonblocking"],
        "none": ["--algo", "none"],
        "none-spawn": ["--algo", "none", "--spawn-workers"],
        "single": ["--algo", "none"],
        "local-async-keep": ["--algo", "local-async", "--period", k, "--keep-training"],
        "lasgd-keep": ["--algo", "lasgd", "--period", k, "--keep-training"],
    }[name]


def common_flags(args: argparse.Namespace) -> list[str]:
    out = ["--dataset", args.dataset, "--model", args.model]
    out += ["--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    out += ["--momentum", str(args.momentum), "--epochs", str(args.epochs)]
    out += ["--eval-every", str(args.eval_every), "--seed", "0"]
    return out + (["--data-dir", args.data_dir] if args.data_dir else [])


def launch(args: argparse.Namespace, name: str, variant: str, tmp: Path) -> dict:
    """One mpirun job of one contender; returns its figures (or an ``error``)."""
    if args.wait_quiet > 0:
        wait_idle(args.wait_quiet, args.max_others)
    slow = variant == "slow"
    ranks = 1 if name == "single" else args.nodes or RANKS
    mpirun = [mpirun_exe(args.mpirun), "-n", str(ranks), "--bind-to", "none"]
    threads = max(1, cores() // args.nodes) if args.nodes else 0  # 0: hpc_asgd's default
    if args.nodes:  # one rank per emulated node, started in it by the launch agent
        mpirun += ["--hostfile", str(tmp / "hosts"), "--map-by", "node", "--prtemca"]
        mpirun += ["plm_ssh_agent", str(ROOT / "scripts" / "node_agent.sh")]
    else:
        mpirun.append("--oversubscribe")
    script = [sys.executable, str(Path(__file__).resolve())]
    env = mpi_env()
    out_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    if name in PEERS:
        opts = {
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "model": args.model,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "momentum": args.momentum,
            "epochs": args.epochs,
            "eval_every": args.eval_every,
            "seed": 0,
            "period": args.period,
            "local_period": args.local_period,
            "group_size": args.group_size,
            "threads": threads,
            "slow_rank": SLOW_RANK if slow else -1,
            "slow_factor": SLOW_FACTOR if slow else 1.0,
        }
        cmd = [*mpirun, *script, "--peer", name, "--peer-opts", json.dumps(opts)]
        master = (tmp / "hosts").read_text().split()[0] if args.nodes else "127.0.0.1"
        env["MASTER_ADDR"], env["MASTER_PORT"] = master, str(free_port())
    else:
        train = ["train", *common_flags(args), *ours_flags(name, args), "--out", str(out_dir)]
        train += ["--threads-per-worker", str(threads)] if threads else []
        if slow:
            train += ["--slow-rank", str(SLOW_RANK), "--slow-factor", str(SLOW_FACTOR)]
        cmd = [*mpirun, *script, "--ours-rank", str(out_dir), "--", *train]
    load = os.getloadavg()[0]
    foreign = Foreign()
    t0 = time.monotonic()
    proc = run_tree(cmd, args.run_timeout, env)  # its own session: killed whole on a timeout
    if proc is None:
        return {"error": f"ran past --run-timeout {args.run_timeout} s", "command": cmd}
    stdout, stderr = proc.stdout, proc.stderr
    job_s = time.monotonic() - t0
    res: dict = {
        "job_s": round(job_s, 2),
        "load_before": load,
        "others_cores": round(foreign.cores(), 3),
    }
    if proc.returncode != 0:
        tail = (stdout + stderr)[-2000:]
        return {**res, "error": f"rc {proc.returncode}: {tail}", "command": cmd}
    if name in PEERS:
        lines = [ln for ln in stdout.splitlines() if ln.startswith(PEER_MARK)]
        if len(lines) != 1:
            return {**res, "error": "no result line: " + stdout[-2000:], "command": cmd}
        res.update(json.loads(lines[0][len(PEER_MARK) :]))
    else:
        try:  # a node taken down under the job (slurm_local.sh stop) can leave no summary
            res.update(read_ours(out_dir, ranks))
        except (OSError, ValueError, KeyError) as e:
            return {**res, "error": f"no summary: {e!r}", "command": cmd}
    if args.nodes and len(set(res.get("hosts") or [])) != ranks:
        return {**res, "error": f"ranks not one per node: {res.get('hosts')}", "command": cmd}
    res["time_to_target_s"] = time_to(res["rows"], args.target)
    tta = res["time_to_target_s"]
    setup = res.get("setup_s")
    res["train_to_target_s"] = tta - setup if tta is not None and setup is not None else None
    train = res.get("train_s_per_rank")
    job_train = res["samples_processed"] / res["samples_per_s"]
    res["job_train_s"] = job_train
    # each rank's own samples: the same for all, unless --keep-training gave some extra steps
    extra = res.get("extra_steps") or [0] * ranks
    per_rank = [(res["steps_per_rank"] + x) * args.batch_size for x in extra]
    res["aggregate_samples_per_s"] = (
        sum(n / t for n, t in zip(per_rank, train, strict=True))
        if train and all(t > 0 for t in train)
        else None
    )
    res["wait_share"] = [w / job_train for w in res["comm_wait_s"]]
    res["command"] = shlex.join(cmd)
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def read_ours(out_dir: Path, ranks: int) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln]
    probes = [out_dir / f"probe-{r}.json" for r in range(ranks)]
    res = {
        "steps_per_rank": summary["steps_per_rank"],
        "extra_steps": summary.get("extra_steps"),
        "samples_processed": summary["samples_processed"],
        "samples_per_s": summary["samples_per_s"],
        "comm_wait_s": summary["comm_wait_s"],
        "comm_inflight_s": summary.get("comm_inflight_s"),
        "comm_overlap": summary.get("comm_overlap"),
        "averaging_rounds": summary.get("averaging_rounds"),
        "consensus": summary.get("consensus"),
        "comm": summary.get("comm"),
        "wall_s": summary["wall_s"],
        "final_test_acc": summary["final_test_acc"],
        "hosts": summary.get("hosts"),
        "rows": rows,
    }
    if all(p.exists() for p in probes):
        recs = [json.loads(p.read_text()) for p in probes]
        if all("train_s" in r and "t_train0" in r for r in recs):
            res["train_s_per_rank"] = [r["train_s"] for r in recs]
            res["setup_s"] = recs[0]["t_train0"] - recs[0]["t_run"]
    return res


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    keys = (
        "samples_per_s",
        "aggregate_samples_per_s",
        "time_to_target_s",
        "train_to_target_s",
        "setup_s",
        "final_test_acc",
        "wall_s",
        "job_s",
        "others_cores",
    )
    out: dict = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok)}
    for key in keys:
        vals = [r.get(key) for r in ok]
        out[key] = median(vals)
        present = [v for v in vals if v is not None]
        out[key + "_range"] = [min(present), max(present)] if present else None
    out["reached_target"] = sum(r.get("time_to_target_s") is not None for r in ok)
    n = max((len(r["wait_share"]) for r in ok), default=0)
    out["wait_share"] = [median([r["wait_share"][i] for r in ok]) for i in range(n)]
    rounds = [r.get("averaging_rounds") for r in ok if r.get("averaging_rounds") is not None]
    out["averaging_rounds"] = median(rounds)
    return out


def paired(runs_a: list[dict], runs_b: list[dict], key: str) -> float | None:
    """Median over repeats of the per-repeat ratio a / b (both from the same repeat)."""
    ratios = [
        a[key] / b[key]
        for a, b in zip(runs_a, runs_b, strict=False)
        if "error" not in a and "error" not in b and a.get(key) and b.get(key)
    ]
    return statistics.median(ratios) if ratios else None


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def goals(report: dict) -> list[dict]:
    res, raw = report["results"], report["runs"]

    def get(name: str, slow: bool | str, key: str):
        return res.get(f"{name}|{VARIANT.get(slow, slow)}", {}).get(key)

    def runs(name: str, slow: bool | str) -> list[dict]:
        return raw.get(f"{name}|{VARIANT.get(slow, slow)}", [])

    out = []
    for link in (v for v, _ in report["variants"] if report["args"]["nodes"] and v in LINKS[1:]):
        for algo in (*NONBLOCKING, "sync"):
            r = ratio(get(algo, link, "samples_per_s"), get(algo, "uncapped", "samples_per_s"))
            out.append(
                {
                    "goal": f"{link}: {algo} keeps "
                    + ("< 0.5" if algo == "sync" else ">= 0.8")
                    + " of its uncapped samples/s",
                    "value": r,
                    "paired": paired(runs(algo, link), runs(algo, "uncapped"), "samples_per_s"),
                    "threshold": 0.5 if algo == "sync" else 0.8,
                    "met": r is not None and (r < 0.5 if algo == "sync" else r >= 0.8),
                    "note": "",
                    "needs": (algo,),
                }
            )
    if report["args"]["nodes"]:  # the 2-rank goals below compare runs these jobs do not have
        return [g for g in out if set(report["contenders"]).issuperset(g.pop("needs"))]
    for algo in ("local-async", "lasgd", *KEEPING):
        r = ratio(get(algo, True, "samples_per_s"), get("sync", True, "samples_per_s"))
        agg = ratio(
            get(algo, True, "aggregate_samples_per_s"), get("sync", True, "aggregate_samples_per_s")
        )
        out.append(
            {
                "goal": f"2x straggler: {algo} samples/s >= 1.45x sync's (1.5x ideal)",
                "value": r,
                "paired": paired(runs(algo, True), runs("sync", True), "samples_per_s"),
                "threshold": 1.45,
                "met": r is not None and r >= 1.45,
                "note": f"aggregate (sum of per-rank rates) ratio: {fmt(agg, '.2f')}",
                "needs": (algo, "sync"),
            }
        )
    r = ratio(get("local-async", False, "samples_per_s"), get("none-spawn", False, "samples_per_s"))
    r_ip = ratio(get("local-async", False, "samples_per_s"), get("none", False, "samples_per_s"))
    out.append(
        {
            "goal": "local-async loses <= 5 % samples/s against --algo none (same W = 1, "
            "spawned worker: none-spawn)",
            "value": r,
            "paired": paired(
                runs("local-async", False), runs("none-spawn", False), "samples_per_s"
            ),
            "threshold": 0.95,
            "met": r is not None and r >= 0.95,
            "note": f"against none in the rank's own process: {fmt(r_ip, '.3f')}",
            "needs": ("local-async", "none-spawn"),
        }
    )
    r = ratio(get("local-async", False, "samples_per_s"), get("torch-ddp", False, "samples_per_s"))
    out.append(
        {
            "goal": "local-async samples/s >= 2.5x torch DDP's (2 ranks)",
            "value": r,
            "paired": paired(runs("local-async", False), runs("torch-ddp", False), "samples_per_s"),
            "threshold": 2.5,
            "met": r is not None and r >= 2.5,
            "note": "",
            "needs": ("local-async", "torch-ddp"),
        }
    )
    r = ratio(
        get("local-async", False, "time_to_target_s"), get("torch-ddp", False, "time_to_target_s")
    )
    r_train = ratio(
        get("local-async", False, "train_to_target_s"), get("torch-ddp", False, "train_to_target_s")
    )
    out.append(
        {
            "goal": f"local-async reaches test accuracy {report['args']['target']} in <= 0.5x "
            "torch DDP's wall time",
            "value": r,
            "paired": paired(
                runs("local-async", False), runs("torch-ddp", False), "time_to_target_s"
            ),
            "threshold": 0.5,
            "met": r is not None and r <= 0.5,
            "note": f"training time only (set-up excluded): {fmt(r_train, '.2f')}",
            "needs": ("local-async", "torch-ddp"),
        }
    )
    # a goal whose contenders were not asked for (--contenders) is left out, not "missed"
    ran = set(report["contenders"])
    return [g for g in out if ran.issuperset(g.pop("needs"))]


def fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


WHAT = {
    "sync": "`--algo sync` (gradient allreduce every step)",
    "local-sgd": "`--algo local-sgd --period K` (blocking)",
    "local-async": "`--algo local-async --period K` (W=1 spawned worker)",
    "lasgd": "`--algo lasgd --period K`",
    "local-async-keep": "local-async as above, `--keep-training`",
    "lasgd-keep": "lasgd as above, `--keep-training`",
    "hier-avg": "`--algo hier-avg --group-size S --local-period K1 --global-period K/K1`",
    "hier-avg-nb": "hier-avg as above, `--hier-mode nonblocking`",
    "none": "`--algo none` (no averaging, in process)",
    "none-spawn": "`--algo none --spawn-workers` (W=1 spawned worker)",
    "single": "one process alone (`mpirun -n 1`, every core's thread), `--algo none`",
    "torch-ddp": "DDP + SGD (Gloo)",
    "torch-postlocal": "DDP + post-local hook + PostLocalSGDOptimizer(PeriodicModelAverager K)",
    "torch-hier": "DDP + post-local hook + HierarchicalModelAverager {K1: S, K: ranks}",
}


def markdown(report: dict) -> str:
    a, v, n = report["args"], report["versions"], report["ranks"]
    where = f"{n} ranks under `mpirun --oversubscribe --bind-to none`, "
    if a["nodes"]:
        where = (
            f"{n} emulated nodes x 1 rank (`scripts/slurm_local.sh start --nodes {n}`: network "
            "namespaces on one bridge, sharing this machine's cores; `mpirun --hostfile` of the "
            "nodes `--map-by node`, launch agent `scripts/node_agent.sh`; ranks ran on "
            f"{', '.join(report['hosts'])}), "
        )
    lines = [
        "# Compare: hpc_asgd synchronisers against torch DDP / post-local SGD / hierarchical "
        "averaging" + (f", {n} nodes with capped links" if a["nodes"] else ""),
        "",
        f"Command: `{report['command']}`",
        "",
        f"Host `{report['hostname']}`, {report['nproc']} cores ({v['cpu']}), {report['date']}; "
        f"torch {v['torch']}, mpi4py {v['mpi4py']}, {v['mpi_library'].split(',')[0]}, "
        f"Python {v['python']}. Load average (1 min) before the benchmark "
        f"{report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}; "
        f"median before each run {fmt(report['load_median_runs'], '.2f')}. "
        f"Wall time {report['wall_s']:.0f} s.",
        "",
        where
        + f"{report['threads_per_rank']} torch thread(s) per rank (cores // ranks; local-async's "
        "worker gets the rank's thread, its main process averages). "
        f"Model `{a['model']}` on `{a['dataset']}` {report['input_shape']}, "
        f"batch {a['batch_size']} per rank, SGD lr {a['lr']} momentum {a['momentum']}, "
        f"{a['epochs']} epochs "
        f"({report['steps_per_rank']} steps per rank), evaluation every {a['eval_every']} epoch, "
        f"K = {a['period']}, K1 = {a['local_period']}, S = {a['group_size']}. Medians of "
        f"{a['repeats']} repeats, [min-max] below each where useful.",
        "",
    ]
    if a["nodes"]:  # the links, and why this cap
        best = max(
            (r["samples_per_s"] or 0 for k, r in report["results"].items() if "|uncapped" in k),
            default=0,
        )  # the fastest uncapped contender's step: about the computation alone
        step_ms = a["batch_size"] * n / best * 1e3 if best else None
        wire_ms = report["ring_bytes"] * 8e3 / rate_bits(a["cap"])
        lines += [
            f"Links: `tc qdisc replace dev hv-NODE root tbf rate {a['cap']} burst 128kb "
            "latency 50ms` on the host's side and the same on the node's `eth0` (both "
            "directions), put on before each run and taken off after it; one-capped caps "
            f"{report['node_names'][-1]}, all-capped every node. Why {a['cap']}: one averaging "
            "round (and one step of sync) allreduces the flat buffer of "
            f"{report['round_bytes'] / 4:.0f} floats ({report['round_bytes'] / 1e6:.2f} MB); a "
            "ring allreduce sends 2(N-1)/N of it each way per rank, "
            f"{report['ring_bytes'] / 1e6:.2f} MB: at least {wire_ms:.0f} ms on the wire at "
            f"{a['cap']}, against {fmt(step_ms, '.1f')} ms per step of the fastest uncapped "
            "contender (about the computation alone). Sync waits for a round every step, so "
            "at this cap it is communication-bound, while the periodic averagers have K steps "
            f"({fmt(step_ms and step_ms * a['period'], '.0f')} ms) to hide one round (at "
            f"1gbit: {report['ring_bytes'] * 8e-6:.0f} ms). Model "
            f"`{a['model']}` on `{a['dataset']}`, not resnet20: a ResNet-20 step is far slower "
            f"on {report['nproc']} cores shared by {n} ranks, too slow for every (contender, "
            "link, repeat); its 0.27 M parameters would also leave more computation per byte "
            "averaged.",
            "",
        ]
    share = " / ".join(f"r{i}" for i in range(n))
    cols = (
        "| contender | samples/s | aggregate samples/s | wall to "
        f"{a['target']} (s) | train to {a['target']} (s) | set-up (s) | final acc | "
        f"wait share {share} | rounds | others' CPU (cores) |"
    )
    for variant, title in report["variants"]:
        lines += [f"## {title}", "", cols, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in report["contenders"]:
            s = report["results"].get(f"{name}|{variant}")
            if s is None:
                continue
            rng = s["samples_per_s_range"]
            sps = fmt(s["samples_per_s"]) + (f" [{rng[0]:.0f}-{rng[1]:.0f}]" if rng else "")
            reach = ""
            if s["reached_target"] < s["runs_ok"]:
                reach = f" ({s['reached_target']}/{s['runs_ok']} reached)"
            share = " / ".join(fmt(x, ".2f") for x in s["wait_share"])
            lines.append(
                f"| {name} | {sps} | {fmt(s['aggregate_samples_per_s'])} | "
                f"{fmt(s['time_to_target_s'], '.2f')}{reach} | "
                f"{fmt(s['train_to_target_s'], '.2f')} | {fmt(s['setup_s'], '.2f')} | "
                f"{fmt(s['final_test_acc'], '.3f')} | {share} | "
                f"{fmt(s['averaging_rounds'], '.0f')} | {fmt(s['others_cores'], '.2f')} |"
                + (f" {s['runs_failed']} run(s) failed" if s["runs_failed"] else "")
            )
        lines.append("")
    links = [x for x, _ in report["variants"]] if a["nodes"] else []
    head = [f"samples/s {x}" for x in links] + [f"{x} / uncapped" for x in links[1:]]
    head += [f"to {a['target']} {x} (s)" for x in links]
    lines += [
        "## Capped / uncapped (ratios of medians)",
        "",
        "| contender | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ] * bool(links)
    for name in report["contenders"] if links else []:
        r = [report["results"].get(f"{name}|{x}", {}) for x in links]
        cells = [fmt(x.get("samples_per_s")) for x in r]
        cells += [
            fmt(ratio(x.get("samples_per_s"), r[0].get("samples_per_s")), ".2f") for x in r[1:]
        ]
        cells += [fmt(x.get("time_to_target_s"), ".2f") for x in r]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] * bool(links) + [
        "## Goals" + (" (the issue's hypothesis, tested)" if a["nodes"] else ""),
        "",
        "| goal | measured (ratio of medians) | paired | met |",
        "|---|---:|---:|---|",
    ]
    for g in report["goals"]:
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(
            f"| {g['goal']} | {fmt(g['value'], '.2f')}{note} | {fmt(g['paired'], '.2f')} | "
            f"{'yes' if g['met'] else 'no'} |"
        )
    lines += [
        "",
        "## Contenders",
        "",
        "| contender | what runs |",
        "|---|---|",
        *[f"| {n} | {WHAT[n]} |" for n in report["contenders"]],
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


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # through the jobs' (and links') cleanup
        signal.signal(sig, lambda *_: sys.exit(143))
    command = shlex.join(["python", "benchmarks/compare.py", *argv])
    print(f"compare benchmark: {command}", flush=True)
    load_before = os.getloadavg()
    if load_before[0] > args.max_load:
        print(
            f"  warning: load average {load_before[0]:.2f} > {args.max_load}: other work is "
            "running, figures will be noisy",
            flush=True,
        )
    from hpc_asgd.data import ShardSampler, load_dataset
    from hpc_asgd.models import build_model

    data = load_dataset(args.dataset, args.data_dir)
    ranks = args.nodes or RANKS
    spe = ShardSampler(len(data.train), 0, ranks, args.batch_size, 0).steps_per_epoch
    variants = [("even", "No straggler")] + [("slow", "Rank 1 slowed 2x")] * (not args.no_straggler)
    nodes: list[str] = []
    if args.nodes:  # the first N emulated nodes; rank r runs on nodes[r]
        found = run_tree(["bash", "scripts/slurm_local.sh", "hostfile"], 60)
        nodes = [ln.split()[0] for ln in found.stdout.splitlines()][: args.nodes] if found else []
        if len(nodes) < args.nodes:
            sys.exit(
                f"compare.py: {args.nodes} emulated nodes needed, found {nodes}: run "
                f"scripts/slurm_local.sh start --nodes {args.nodes} (as root)"
            )
        shown = [run_tree(c, 10) for x in nodes for c in link_tc(x, "show")]
        if any(r is None or "tbf" in r.stdout for r in shown):  # left by a killed run
            sys.exit(
                'compare.py: a tbf is on a node\'s link already, "uncapped" would be capped '
                "(tc qdisc del dev hv-NODE root, and on its eth0):\n"
                + "".join(r.stdout for r in shown if r)
            )
        titles = {"uncapped": "Uncapped links", "all-capped": f"Every link capped at {args.cap}"}
        titles["one-capped"] = f"{nodes[-1]}'s link capped at {args.cap}"
        variants = [(x, titles[x]) for x in args.links]
    capped = {"one-capped": nodes[-1:], "all-capped": nodes}
    pairs = [
        (n, x) for x, _ in variants for n in args.contenders if x != "slow" or n not in BASELINES
    ]
    runs: dict[str, list[dict]] = {f"{n}|{x}": [] for n, x in pairs}
    # each node has its own /tmp: the run folders of --nodes live where every node sees them
    tmp = Path(tempfile.mkdtemp(prefix="hpc_asgd_compare_", dir="/var/tmp" if nodes else None))
    (tmp / "hosts").write_text("".join(f"{x} slots=1\n" for x in nodes))

    def launch_on(name: str, variant: str) -> dict:  # with the variant's links capped
        try:
            with capped_links(capped.get(variant, []), args.cap):
                return launch(args, name, variant, tmp)
        except subprocess.CalledProcessError as e:  # a link gone: the cluster was restarted
            return {"error": f"{shlex.join(e.cmd)}: {e.stderr.strip()}"}

    try:
        for rep in range(args.repeats):
            k = (rep * 3) % len(pairs)
            for name, variant in pairs[k:] + pairs[:k]:
                key = f"{name}|{variant}"
                res = launch_on(name, variant)
                tries = 1
                # A run during which other work took CPU is repeated (--retry-noisy times);
                # the quietest attempt counts.
                while (
                    tries <= args.retry_noisy
                    and "error" not in res
                    and res["others_cores"] > args.max_others
                ):
                    print(
                        f"  [{rep}] {key}: others used {res['others_cores']:.2f} cores, again",
                        flush=True,
                    )
                    again = launch_on(name, variant)
                    tries += 1
                    if "error" not in again and again["others_cores"] < res["others_cores"]:
                        res = again
                res["repeat"], res["attempts"] = rep, tries
                runs[key].append(res)
                if "error" in res:
                    print(f"  [{rep}] {key}: FAILED {res['error'][:400]}", flush=True)
                else:
                    print(
                        f"  [{rep}] {key}: {res['samples_per_s']:.0f} samples/s, "
                        f"to target {fmt(res['time_to_target_s'], '.2f')} s, "
                        f"acc {res['final_test_acc']:.3f}, job {res['job_s']:.1f} s, "
                        f"load {res['load_before']:.2f}, others {res['others_cores']:.2f} cores",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loads = [r["load_before"] for rs in runs.values() for r in rs if "load_before" in r]
    model = build_model(args.model, data.input_shape, data.num_classes)
    floats = sum(
        t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()
    )
    report = {
        "benchmark": "compare",
        "command": command,
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "ranks": ranks,
        "node_names": nodes,
        "hosts": sorted({h for rs in runs.values() for r in rs for h in r.get("hosts") or []}),
        "variants": variants,
        "round_bytes": 4 * floats,  # float32, the flat buffer every averaging round reduces
        "ring_bytes": 4 * floats * 2 * (ranks - 1) / ranks,  # each way per rank, ring
        "threads_per_rank": max(1, cores() // ranks),
        "versions": versions(mpi=True),
        "input_shape": list(data.input_shape),
        "steps_per_rank": max(1, math.ceil(args.epochs * spe)),
        "contenders": list(args.contenders),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "load_median_runs": median(loads),
        "runs": runs,
        "results": {key: summarise(rs) for key, rs in runs.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    report["goals"] = goals(report)
    out_dir = ROOT / args.out  # an absolute --out stays as given
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out_dir / f"{args.stem}.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / args.stem}.json and .md")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CHOICES,
        default=None,
        help="default: all but the -keep ones; with --nodes: " + " ".join(NODE_CONTENDERS),
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="N > 1: one rank on each of N emulated nodes (scripts/slurm_local.sh start --nodes "
        "N), each contender once per --links setting instead of the straggler (root only)",
    )
    p.add_argument("--links", nargs="+", choices=LINKS, default=list(LINKS), help="with --nodes")
    p.add_argument(
        "--cap",
        default="100mbit",
        help="tc rate of a capped link (with --nodes); the default makes sync "
        "communication-bound with cnn (see the Markdown)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="S: ranks per hier-avg group (torch-hier's first level); 0: 1, with --nodes N / 2",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=float, default=16.0, help="passes over each rank's shard")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat of 3 epochs")
    p.add_argument("--no-straggler", action="store_true", help="skip the 2x-straggler runs")
    p.add_argument("--target", type=float, default=0.90, help="test accuracy to time")
    p.add_argument("--dataset", default="digits", help="digits (default) or mnist with --data-dir")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=float, default=0.5, help="epochs between evaluations")
    p.add_argument("--period", type=int, default=8, help="K: steps between model averages")
    p.add_argument("--local-period", type=int, default=2, help="K1 of hier-avg / torch-hier")
    p.add_argument("--max-load", type=float, default=1.5, help="warn above this load average")
    p.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="cores' worth of CPU that other processes may take during a run before it counts "
        "as noisy",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for other processes to use at most "
        "--max-others cores",
    )
    p.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        help="repeat a noisy run up to N times, keep the quietest",
    )
    p.add_argument("--out", default="benchmarks/results", help="relative to the repository")
    p.add_argument("--stem", default="compare", help="output files <out>/<stem>.json and .md")
    p.add_argument("--mpirun", default=None, help="mpirun to use (default: the venv's, or PATH)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds per mpirun job")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs = 1, 3.0
    if args.repeats < 1 or args.epochs <= 0:
        p.error("--repeats >= 1 and --epochs > 0")
    if args.period % args.local_period:
        p.error("--local-period must divide --period")
    args.contenders = args.contenders or list(NODE_CONTENDERS if args.nodes else CONTENDERS)
    args.links = sorted(set(args.links), key=LINKS.index)  # uncapped first: the ratios' base
    args.group_size = args.group_size or max(1, args.nodes // 2)
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
    if argv[:1] == ["--ours-rank"]:  # one rank of ours: --ours-rank DIR -- train ...
        return ours_rank(argv[1], argv[3:])
    if argv[:1] == ["--peer"]:  # one rank of a peer: --peer NAME --peer-opts JSON
        return peer_rank(argv[1], json.loads(argv[3]))
    args = parse(argv)
    return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
