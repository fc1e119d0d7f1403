"""``hpc-asgd train | info | report | predict``: a thin entry point over ``config``, ``env``,
``train``, ``report`` and ``predict``.

Errors end the job with one readable line (``hpc-asgd: error on rank R/N (HOST): ...``) and a
non-zero exit: configuration errors on every rank before any collective (exit 2, printed by rank 0);
anything later aborts every rank through the engine (exit 1), as ``python -m mpi4py`` does,
except where every survivor of a lost rank knows the job ends (``TooFewRanks``): each exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from hpc_asgd import env
from hpc_asgd.config import SECTIONS, Config
from hpc_asgd.errors import ConfigError, Preempted, TooFewRanks, error_line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpc-asgd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (alone, or under mpirun / srun / torchrun)")
    train.add_argument("--config", help="TOML file of field = value (flags override it)")
    defaults = Config()
    for sec in SECTIONS:
        group = train.add_argument_group(sec)
        for f in fields(getattr(defaults, sec)):
            flag = f.metadata.get("flag", _flag(f.name))
            typ = str(f.type)
            # argparse's own default stays None, so that a --config file's value is kept when
            # the flag is absent; the help shows the configuration's real default instead.
            help = f.metadata.get("flag_help", f.metadata["help"])
            value = getattr(getattr(defaults, sec), f.name)
            if not typ.startswith("bool") and value not in (None, ()):
                shown = list(value) if isinstance(value, tuple) else value
                help += f" (default: {shown})"
            kw: dict = {"dest": f.name, "default": None, "help": help}
            if typ.startswith("bool"):
                # --no-verify style flags store False; the rest store True.
                kw["action"] = "store_false" if flag.startswith("--no-") else "store_true"
            elif typ.startswith("tuple"):
                kw.update(type=float, nargs="*")
            else:
                base = typ.split(" ", maxsplit=1)[0].split("|", maxsplit=1)[0]
                kw["type"] = {"int": int, "float": float}.get(base, str)
            group.add_argument(flag, **kw)
    # set by a job's survivors on the replacements they start (--max-ranks): not for users
    train.add_argument("--join", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("info", help="engines found, MPI library, topology and versions")
    report = sub.add_parser(
        "report", help="a Markdown report with plots of finished runs (needs matplotlib)"
    )
    report.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR",
        help="a run's --out folder, or a folder of them (a scaling study's --out-root)",
    )  # fmt: skip
    report.add_argument(
        "--out", type=Path, default=None, help="where to write report.md and the PNGs "
        "(default: RUN_DIR/report for one RUN_DIR, else ./report)",
    )  # fmt: skip
    from hpc_asgd.tools.predict_cli import add_arguments
    from hpc_asgd.tools.safe_io import one_line_errors

    one_line_errors(report)

    add_arguments(
        sub.add_parser(
            "predict",
            help="samples/s and parallel efficiency from 1 to 4,096 nodes (an analytic model; "
            "--calibrate RUN_DIR... fits it to measured runs)",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    values = Config.read_file(args.config) if args.config else {}
    Config.from_flat(values, source=args.config)  # the file's own values typed, even if a flag wins
    names = {f.name for klass in SECTIONS.values() for f in fields(klass)}
    for name in names:
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    return Config.from_flat(values, source=args.config or "flags")


def _steps(summary: dict) -> str:
    """Per rank, and how they were counted (``--budget``)."""
    taken = summary["steps_taken"]
    steps = " / ".join(map(str, taken)) if len(set(taken)) > 1 else f"{taken[0]} per rank"
    if summary["budget"] == "job":
        steps += f" (the job's budget, {summary['budget_used']:.2f}x used)"
    if summary["ended_by"] == "time":
        steps += f" (--time-budget {summary['time_budget_min']:g} min spent)"
    return steps


def _table(summary: dict) -> str:
    update = summary["update"] if summary["worker_processes"] else "none (in-process, W = 1)"
    rounds = summary["averaging_rounds"]
    if "group_rounds" in summary:  # hier-avg: group rounds and global rounds
        rounds = f"{summary['group_rounds']} group / {rounds} global"
    rows = [
        ("algo / update", f"{summary['algo']} / {update}"),
        (
            "engine, ranks x workers",
            f"{summary['comm']}, {summary['world_size']} x {summary['workers_per_rank']}",
        ),
        ("dataset / model", f"{summary['dataset']} / {summary['model']}"),
        ("epochs", summary["epochs"]),
        ("node steps taken", _steps(summary)),
        ("samples processed", summary["samples_processed"]),
        ("samples/s (training)", summary["samples_per_s"]),
        ("wall time (s)", summary["wall_s"]),
        ("averaging rounds", rounds),
        ("final test accuracy", f"{summary['final_test_acc']:.4f}"),
        ("final test loss", f"{summary['final_test_loss']:.4f}"),
        ("consensus (checksums equal)", summary["consensus"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


class FolderInUse(ConfigError):
    """``--out`` or this configuration's checkpoints are held by another live run."""


def _hold(cfg: Config, launch: env.Launch) -> list:
    """Rank 0 holds ``--out`` and this configuration's lock in ``--checkpoint-dir``."""
    from hpc_asgd import runlock
    from hpc_asgd.checkpoint import identity

    held: list = []
    try:
        for flag, folder, name in (
            ("out", cfg.run.out, runlock.NAME),
            ("checkpoint_dir", cfg.run.checkpoint_dir, f".hpc-asgd-{identity(cfg)[0]}.lock"),
        ):
            if folder:
                try:
                    held.append(runlock.hold(Path(folder), flag, launch.slurm_job_id, name))
                except ConfigError as e:
                    raise FolderInUse(str(e)) from None
    except BaseException:
        _release(held)
        raise
    return held


def _release(held: list) -> None:
    for h in held:
        if h is not None:
            h.release()


def _agree_in_use(comm, in_use: FolderInUse | None) -> None:
    """Rank 0's verdict on the folders, on every rank (a 1-element MAX allreduce)."""
    import torch

    flag = torch.tensor([0.0 if in_use is None else 1.0])
    if comm.size > 1:
        comm.allreduce_(flag, op="max")
    if in_use is not None:
        raise in_use
    if flag.item():
        raise FolderInUse("the output folder is in use by another run (rank 0 says which)")


def cmd_train(args: argparse.Namespace, launch: env.Launch) -> int:
    from hpc_asgd import elastic, failure, signals

    signals.install()  # before torch is imported: a USR1 or TERM at start-up is not lost
    from hpc_asgd.comm import make_comm
    from hpc_asgd.train import PRELOAD, Tracker, run, spawns_workers
    from hpc_asgd.workers import start_early

    try:
        cfg = config_from_args(args)
        if not launch.joining:  # a replacement's job was validated by its ranks (and once
            cfg.validate(launch.size, launch.local_size)  # joined, again: train.run)
            elastic.check(cfg, launch)
        cfg.check_paths()
        cfg.check_factories()  # your own model / dataset / loss: imported, built, fitted
    except ConfigError as e:
        # Every rank reaches the same verdict; rank 0 says it once. The others linger a moment
        # so that the launcher, which ends the job at the first non-zero exit, lets it speak.
        if launch.rank == 0:
            print(f"hpc-asgd: error: {e}", file=sys.stderr, flush=True)
        else:  # the launcher's SIGTERM ends the wait quietly (no StoppedError traceback)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(1.0)
        return 2
    folders = [Path(p) for p in (cfg.run.out, cfg.run.checkpoint_dir) if p]
    held: list = []
    in_use: FolderInUse | None = None
    if launch.rank == 0 and not launch.joining:  # one live run per folder: refused after the
        try:  # engine is up (below)
            held = _hold(cfg, launch)
        except FolderInUse as e:
            in_use, folders = e, []  # nothing of this run goes into the other run's folders
    if launch.rank == 0 and in_use is None and not launch.joining:  # an earlier run's record
        failure.clear(folders)
    comm = None
    tracker = Tracker()
    failure.arm(launch, [] if launch.joining else folders, lambda: tracker.step)
    try:
        if spawns_workers(cfg):  # forked before MPI (and CUDA) start: see workers.start_early
            start_early(fork=cfg.run.device == "cpu", preload=PRELOAD)
        comm = make_comm(cfg.run.comm, launch, cfg.run.comm_timeout)
        if launch.joining:  # from here on, the rank it took in the running job
            rank = comm.world_ranks[comm.rank]  # type: ignore[attr-defined]
            launch = replace(launch, rank=rank, size=comm.size, fault=None)
            failure.arm(launch, folders, lambda: tracker.step)
        else:
            _agree_in_use(comm, in_use)
        summary = run(cfg, launch, comm, tracker)
    except FolderInUse as e:  # every rank knows (one allreduce): rank 0 says it; all exit 2
        if launch.rank == 0:
            print(f"hpc-asgd: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Preempted as e:  # every rank checkpointed at the same step: no abort
        if launch.rank == 0:
            print(f"hpc-asgd: {e}", file=sys.stderr, flush=True)
        return Preempted.EXIT_CODE
    except (Exception, KeyboardInterrupt) as e:
        line = error_line(launch.rank, launch.size, e, launch.hostname)
        print(line, file=sys.stderr, flush=True)
        failure.report(e, line)
        if os.environ.get("HPC_ASGD_TRACEBACK"):
            import traceback

            traceback.print_exc()
        if isinstance(e, TooFewRanks):  # every survivor raised it: no abort (see above)
            _release(held)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # not MPI_Finalize: a fence with the dead ranks
        if comm is not None and comm.size > 1:
            _release(held)  # before the abort: another run may take the folder now
            comm.abort(1)
        return 1
    finally:
        _release(held)
    if launch.rank == 0:
        print(_table(summary), flush=True)
    if summary.get("membership") and not launch.joining:  # (a replacement finalizes: its
        # MPI world is its own, and mpirun takes its exit without MPI_Finalize as a failure)
        # After a loss, ULFM's MPI_Finalize shrinks COMM_WORLD once more and fences with the
        # job; it can hang there (open-mpi/ompi#11404; seen once in CI, after the survivors'
        # summary). Everything is written and every collective is done; under --with-ft ulfm
        # mpirun takes a rank that exits 0 without finalizing as a clean end (measured: rc 0).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_info(launch: env.Launch) -> int:
    import torch

    info: dict = {
        "launcher": launch.launcher,
        "rank": launch.rank,
        "world_size": launch.size,
        "host": launch.hostname,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "engines": {},
    }
    try:
        import mpi4py

        from hpc_asgd.comm.mpi import cuda_aware, library_version

        info["engines"]["mpi"] = {
            "mpi4py": mpi4py.__version__,
            "library": library_version(),
            "cuda_aware": cuda_aware(),
        }
    except ImportError as e:
        info["engines"]["mpi"] = f"unavailable ({e})"
    import torch.distributed as dist

    info["engines"]["gloo"] = dist.is_available() and dist.is_gloo_available()
    info["engines"]["nccl"] = (
        dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()
    )
    try:
        import horovod

        info["engines"]["horovod"] = horovod.__version__
    except ImportError:
        info["engines"]["horovod"] = "unavailable (see scripts/install_horovod.sh)"
    if launch.rank == 0:
        print(json.dumps(info, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Any error: one line on stderr and exit 2, no file half-written (see ``run_tool``)."""
    from hpc_asgd.tools.report import ReportError, write_report
    from hpc_asgd.tools.safe_io import run_tool, say, shown

    def report() -> int:
        out = args.out or (args.runs[0] / "report" if len(args.runs) == 1 else Path("report"))
        path = write_report(args.runs, out)
        say(f"hpc-asgd report: wrote {shown(path)} and its plots", ReportError)
        return 0

    return run_tool("report", report)


def cmd_predict(args: argparse.Namespace) -> int:
    """Any error: one line on stderr and exit 2, no file half-written (see ``run_tool``)."""
    from hpc_asgd.tools.predict_cli import main as predict
    from hpc_asgd.tools.safe_io import run_tool

    return run_tool("predict", lambda: predict(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return cmd_report(args)
    if args.command == "predict":
        return cmd_predict(args)
    try:
        launch = env.detect()
    except ValueError as e:
        print(f"hpc-asgd: error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":  # how the survivors of a loss start a replacement of this
        given = list(sys.argv[1:] if argv is None else argv)
        command = (sys.executable, "-m", "hpc_asgd.cli", *[a for a in given if a != "--join"])
        launch = replace(launch, command=command, joining=args.join)
    if args.command == "info":
        return cmd_info(launch)
    return cmd_train(args, launch)


if __name__ == "__main__":
    sys.exit(main())
