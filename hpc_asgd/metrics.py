"""Outputs of a run (rank 0 only): ``metrics.jsonl``, ``summary.json``, ``model.pt``, progress.

Every file is written atomically (temp file in the same folder, fsync, rename), so a reader
never takes a half-written file for a good one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import hpc_asgd
from hpc_asgd.errors import HpcAsgdError, OutputError, WriteError

if TYPE_CHECKING:  # the summary reads the driver's job; the driver writes with this module
    from hpc_asgd.driver import Job


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, rename it into place.

    A write that fails, however the writer says it (OSError, or torch's RuntimeError on a full
    disk), leaves ``path`` as it was and raises :class:`WriteError` (an OSError) naming it."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, HpcAsgdError):
            raise _write_error(path, e) from e
        raise


def _write_error(path: Path, e: Exception) -> WriteError:
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror
    else:  # torch: "[enforce fail at inline_container.cc:672] . unexpected pos 36096 vs 36048"
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    try:
        free = shutil.disk_usage(path.parent).free
        why += f"; {free / 1024:.0f} KiB free on its file system"
    except OSError:
        pass
    err = WriteError(f"could not write {path}: {why}")
    err.errno = getattr(e, "errno", None)
    return err


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: strict JSON (RFC 8259) has
    no NaN or Infinity, and readers such as ``jq`` or JavaScript reject Python's bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((dumps(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(dumps(r) + "\n" for r in rows).encode()))


def save_model(path: Path, module: torch.nn.Module, config: dict) -> None:
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"state_dict": state, "config": config}, f))


def process_age_s() -> float:
    """Seconds since this process was created (its interpreter's start, before any import),
    to 10 ms (the kernel's clock ticks); NaN where ``/proc`` does not tell."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return math.nan


def versions(comm_name: str | None = None) -> dict[str, str]:
    out = {
        "hpc_asgd": hpc_asgd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    if comm_name == "mpi":
        import mpi4py

        from hpc_asgd.comm.mpi import library_version

        out["mpi4py"] = mpi4py.__version__
        out["mpi"] = library_version()
    return out


class Progress:
    """Rank 0's progress. On a terminal, one live line under the epoch lines (tqdm): node
    steps / budget, epoch, samples/s (all ranks), the last test accuracy and the ETA; in logs
    and under SLURM (no TTY) the per-epoch lines only."""

    def __init__(
        self, total_steps: int, steps_per_epoch: int, enabled: bool, tty: bool, samples: int = 1
    ):
        self.total, self.spe, self.samples = total_steps, steps_per_epoch, samples
        self.enabled, self.tty = enabled, tty
        self.bar: Any = None  # made at the first step: start-up messages come before it
        self.acc: float | None = None
        self.warned: set[str] = set()

    def step(self, step: int) -> None:
        if not (self.enabled and self.tty):
            return
        if self.bar is None:
            from tqdm import tqdm

            # a terminal that reports no width (0 columns: a fresh pty) would get an empty bar
            wide = shutil.get_terminal_size((0, 0)).columns > 0
            self.bar = tqdm(
                total=self.total,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=wide,
                ncols=None if wide else 100,
                mininterval=0.2,
                unit="step",
                bar_format="{l_bar}{bar}| {n}/{total} steps [{elapsed}<{remaining}{postfix}]",
            )
        bar = self.bar
        if step == bar.n:  # the workers' main loop asks between their steps too
            return
        bar.update(step - bar.n)
        elapsed = bar.format_dict["elapsed"]  # since the first step
        post = [f"ep {step / self.spe:.2f}"]
        if elapsed > 0:
            post.append(f"{bar.n * self.samples / elapsed:,.0f} samples/s")
        if self.acc is not None:
            post.append(f"acc {self.acc:.4f}")
        bar.set_postfix_str(", ".join(post), refresh=False)

    def _print(self, line: str, file) -> None:
        if self.bar is not None:  # above the bar, which is drawn again under it
            self.bar.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def warn(self, message: str) -> None:
        """One warning line (rank 0), each distinct message once."""
        if self.enabled and message not in self.warned:
            self.warned.add(message)
            self._print(f"hpc-asgd: warning: {message}", sys.stderr)

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        self.acc = row["test_acc"]
        self._print(
            f"epoch {row['epoch']:6.2f}  time {row['time_s']:7.1f}s  "
            f"train_loss {row['train_loss']:.4f}  "
            f"test_loss {row['test_loss']:.4f}  test_acc {row['test_acc']:.4f}",
            sys.stdout,
        )


def summarise(job: Job, train_s: float, out: Path | None) -> dict:
    """``summary.json``: what ran, where, how fast, how well; collective (every rank gathers
    the per-rank figures); rank 0 writes the outputs. Raises rather than write a model with
    non-finite parameters."""
    from hpc_asgd.comm.base import gather_hosts
    from hpc_asgd.stats import CPU_S, NONFINITE, STEPS, DivergedError, step_times, worker_metrics

    cfg, comm, flat, sync, total = job.cfg, job.comm, job.flat, job.sync, job.total
    d, s = cfg.data, cfg.sync
    digest = bytes.fromhex(flat.checksum())
    sums = comm.allgather(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    finite = bool(torch.isfinite(flat.data).all())
    timed_out = float(sync.budget.ended_by == "time")
    mine = [sync.wait_s, train_s, sync.inflight_s, job.extra, job.setup_s, float(finite)]
    # in process (no workers) the rank's own process takes the steps: no averager to cost
    mine.append(math.nan if job.averager_cpu_s is None else job.averager_cpu_s)
    mine += [timed_out, job.launch_s, job.run_s]
    waits = comm.allgather(torch.tensor(mine, dtype=torch.float64))  # (ranks, 10)
    bad = [r for r in range(comm.size) if not waits[r, 5]]
    if bad:  # a non-finite model is never written as the result
        raise DivergedError(
            f"the final model of rank(s) {', '.join(map(str, bad))} has non-finite parameters; "
            f"not written (lower --lr ({cfg.optim.lr:g}) or add --warmup-epochs)"
        )
    hosts = gather_hosts(comm, job.launch.hostname)
    extras = sync.metrics()  # collective where the synchroniser gathers (hier-avg's groups)
    all_stats = comm.allgather(job.stats)  # (ranks, W, NSTATS)
    extra = [round(float(x)) for x in waits[:, 3]]
    taken = [total + x for x in extra]
    if job.membership:  # the schedule changed under the ranks: the steps they counted
        taken = [round(float(x)) for x in all_stats[:, :, STEPS].sum(1)]
        extra = [t - total for t in taken]
    # --min-ranks: the job's budget as it started; the lost ranks' steps that count for it
    budget = job.world_size_start * job.total_start if job.membership else total * comm.size
    credited = sum(m["credited_steps"] for m in job.membership)
    samples = sum(taken) * d.batch_size
    train_s_max = float(waits[:, 1].max())
    rows = job.evaluator.rows
    summary = {
        "algo": s.algo,
        "update": cfg.workers.update,
        # worker processes per rank sharing its model through the update rule; 0: W = 1 steps
        # in the rank's own process, and no update rule is in play
        "worker_processes": cfg.workers.workers if job.spawn else 0,
        "comm": comm.name,
        "world_size": comm.size,
        "workers_per_rank": cfg.workers.workers,
        "dataset": d.dataset,
        "model": cfg.model.model,
        "epochs": cfg.run.epochs,
        # job: the ranks' node steps counted together against the budget (a fast rank takes
        # more than steps_per_rank, a slow one fewer); rank: each rank takes steps_per_rank
        "budget": "job" if sync.budget.steps else "rank",
        "steps_per_rank": total,  # the schedule: --epochs passes over a rank's shard
        "steps_taken": taken,  # per rank
        "extra_steps": extra,  # per rank: steps_taken - steps_per_rank
        # the steps taken over the job's budget (steps_per_rank x ranks); never below 1 under
        # --budget job (unless the time budget ended it); above 1 by the steps the other ranks
        # took after the last round a rank saw before it stopped (``rounds.Budget``)
        "budget_used": round((sum(taken) + credited) / budget, 4),
        "time_budget_min": cfg.run.time_budget or None,
        "ended_by": "time" if waits[:, 7].max() > 0 else "steps",
        "samples_processed": samples,
        "wall_s": round(time.perf_counter() - job.t_start, 3),
        "hosts": hosts,  # per rank: where it ran
        # per rank: start-up (``run`` to the first training step: data, model, workers) and
        # training time (first step to last, without evaluation passes); samples_per_s uses the max
        "setup_s": [round(float(x), 3) for x in waits[:, 4]],
        "train_s": [round(float(x), 3) for x in waits[:, 1]],
        # per rank: launch (the process's creation, before its imports) to the first training
        # step; and the first training step to the end of the final evaluation (training,
        # evaluations, the final averaging: this session)
        "launch_s": [round(float(x), 3) for x in waits[:, 8]],
        "run_s": [round(float(x), 3) for x in waits[:, 9]],
        "samples_per_s": round(samples / train_s_max, 1) if train_s_max > 0 else None,
        "final_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "averaging_rounds": sync.rounds,
        # per rank: steps skipped for a non-finite loss or gradient (--max-nonfinite)
        "nonfinite_steps": [int(x) for x in all_stats[:, :, NONFINITE].sum(1)],
        # per rank, CPU seconds while training (this session): the rank's main process, the
        # averager when workers train (evaluation passes excluded; null in process), and
        # the steps of its workers (of the rank's own process in process)
        "averager_cpu_s": [round(float(x), 4) for x in waits[:, 6]],
        "worker_cpu_s": [round(float(x), 4) for x in all_stats[:, :, CPU_S].sum(1)],
        **step_times(all_stats),
        # the averaged vector: parameters (sync allreduces their gradients) and float buffers
        "model_params": flat.n_params,
        "model_floats": len(flat),
        "comm_wait_s": [round(float(x), 4) for x in waits[:, 0]],
        "comm_inflight_s": [round(float(x), 4) for x in waits[:, 2]],
        # share of the communication time hidden behind computation, per rank
        "comm_overlap": [
            round(max(0.0, 1 - float(w) / float(f)), 4) if f > 0 else None
            for w, f in zip(waits[:, 0], waits[:, 2], strict=True)
        ],
        # --min-ranks: the ranks the job started with, and one row per loss (elastic.py)
        "world_size_start": job.world_size_start or comm.size,
        "membership": job.membership,
        "steps_lost": round(sum(m["steps_lost"] for m in job.membership), 1),
        "param_checksums": [bytes(row.tolist()).hex() for row in sums],
        "consensus": len({bytes(row.tolist()) for row in sums}) == 1,
        "workers": worker_metrics(cfg.workers.update, all_stats),
        "versions": versions(comm.name),
        "config": cfg.to_dict(),
        **extras,
    }
    if comm.rank == 0 and out:
        write_outputs(out, job, summary)
    return summary


def write_outputs(out: Path, job: Job, summary: dict) -> None:
    """model.pt, then summary.json (its presence says the run completed), and metrics.jsonl
    once more. Should ``out`` fail now (full, gone, read-only), hours of training are not
    thrown away: the outputs go to a rescue folder and the error says where."""

    def write(folder: Path) -> None:
        save_model(folder / "model.pt", job.flat.module, job.cfg.to_dict())
        write_jsonl(folder / "metrics.jsonl", job.evaluator.rows)
        write_json(folder / "summary.json", summary)

    try:
        write(out)
    except OSError as e:
        stamp = job.launch.slurm_job_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for base in (Path.cwd(), Path(tempfile.gettempdir())):
            rescue = base / f"hpc-asgd-rescue-{stamp}"
            try:
                write(rescue)
            except OSError:  # no half rescue folder left behind to be taken for a whole one
                shutil.rmtree(rescue, ignore_errors=True)
                continue
            why = e.strerror or str(e).removeprefix("could not write ")
            raise OutputError(
                f"could not write the outputs to {out} ({why}); "
                f"model.pt, metrics.jsonl and summary.json were saved to {rescue}"
            ) from e
        raise
