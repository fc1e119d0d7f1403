"""Evaluations: each rank tests its model on a disjoint shard of the test set; the sums over
the ranks make one row of ``metrics.jsonl``.

The sum is a blocking allreduce only at the end of the run. Before, it is an iallreduce whose
row is recorded when it completes: a rank ahead of the others never waits for them at an
evaluation. Rows complete in the order they were posted, the same on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hpc_asgd import metrics
from hpc_asgd.comm import Comm
from hpc_asgd.data import Dataset, ShardSampler
from hpc_asgd.stats import LOSS_SUM, NONFINITE, STEPS

EVAL_BATCH = 512


def evaluate(
    model: torch.nn.Module,
    data: Dataset,
    comm: Comm,
    device: torch.device,
    extra: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """Test loss and accuracy over this rank's shard of the test set, with its own model:
    ``[correct, loss_sum, count, *extra]`` (float64), to be summed over the ranks. ``loss``
    gives a batch's mean (its sum is the mean times the batch); accuracy is the argmax's."""
    sampler = ShardSampler(
        len(data.test), comm.rank, comm.size, EVAL_BATCH, seed=0, shuffle=False, drop_last=False
    )
    acc = torch.zeros(3, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in sampler.epoch(0):
            x, y = data.test.batch(idx, train=False)
            out = model(x.to(device))
            y = y.to(device)
            acc[0] += (out.argmax(1) == y).sum().item()
            if loss is F.cross_entropy:
                acc[1] += F.cross_entropy(out, y, reduction="sum").item()
            else:
                acc[1] += loss(out, y).item() * y.shape[0]
            acc[2] += y.shape[0]
    model.train(was_training)
    return torch.cat([acc, extra.to(torch.float64)])


class Evaluator:
    """Evaluates at node steps and records the rows (rank 0 also writes ``metrics.jsonl``).

    Besides the test metrics a row holds the training loss since the previous evaluation,
    summed over the ranks with the same allreduce: ``seen`` is this rank's ``(loss_sum,
    steps)`` of the stats table at the last evaluation (steps skipped for a non-finite loss
    add none)."""

    def __init__(
        self,
        data: Dataset,
        comm: Comm,
        device: torch.device,
        stats: torch.Tensor,
        spe: int,
        batch_size: int,
        progress: metrics.Progress,
        out: Path | None,
        t_start: float,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ):
        self.data, self.comm, self.device, self.stats = data, comm, device, stats
        self.spe, self.batch_size, self.progress, self.out = spe, batch_size, progress, out
        self.t_start, self.loss = t_start, loss
        self.rows: list[dict] = []
        # --budget job: ranks take different node steps, so a row's epoch is the job's
        # (steps summed over the ranks / (ranks x steps per epoch)), not a rank's node step
        self.job_epochs = False
        self.seen = torch.zeros(2, dtype=torch.float64)
        self.handles: list[Callable[[bool], bool]] = []  # sums in flight, oldest first
        self.on_row: Callable[[int, dict], None] | None = None  # rank 0: --tensorboard
        # CPU seconds of this process's evaluation passes and their rows' output (not training)
        self.cpu_s = 0.0

    def state_dict(self) -> dict:
        return {"rows": list(self.rows), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.rows[:] = state["rows"]
        self.seen.copy_(state["seen"])

    def at(self, step: int, model: torch.nn.Module, final: bool = False) -> None:
        """Evaluate ``model`` on this rank's shard now, as the row of node step ``step``.
        ``final``: every earlier sum completes first, then this one, blocking."""
        c0 = time.process_time()
        s = self.stats
        now = torch.stack([s[:, LOSS_SUM].sum(), (s[:, STEPS] - s[:, NONFINITE]).sum()])
        st = evaluate(model, self.data, self.comm, self.device, now - self.seen, self.loss)  # (5,)
        self.seen.copy_(now)
        at = round(time.perf_counter() - self.t_start, 3)  # the time of this rank's pass
        self.cpu_s += time.process_time() - c0
        if final:
            self.complete(wait=True)
            self.comm.allreduce_(st)
            self._record(step, at, st)
            return
        work = self.comm.iallreduce_(st)

        def complete(wait: bool) -> bool:
            if wait:
                work.wait()
            elif not work.test():
                return False
            self._record(step, at, st)
            return True

        self.handles.append(complete)

    def complete(self, wait: bool) -> None:
        """Record the rows whose sums finished (``wait``: all of them, blocking), in order."""
        while self.handles and self.handles[0](wait):
            self.handles.pop(0)

    def _record(self, step: int, at: float, st: torch.Tensor) -> None:
        c0 = time.process_time()  # the row's output is the evaluation's, not training's
        try:
            self._write(step, at, st)
        finally:
            self.cpu_s += time.process_time() - c0

    def _write(self, step: int, at: float, st: torch.Tensor) -> None:
        before = self.rows[-1]["samples"] if self.rows else 0
        samples = before + round(float(st[4])) * self.batch_size  # steps, all ranks
        per_epoch = self.comm.size * self.spe * self.batch_size
        row = {
            "epoch": round(samples / per_epoch if self.job_epochs else step / self.spe, 4),
            "time_s": at,
            "samples": samples,
            "train_loss": float(st[3] / max(float(st[4]), 1.0)),
            "test_acc": float(st[0] / st[2]),
            "test_loss": float(st[1] / st[2]),
        }
        self.rows.append(row)
        self.progress.epoch(row)
        if self.on_row is not None:
            self.on_row(step, row)
        if self.comm.rank == 0 and self.out:
            try:
                metrics.write_jsonl(self.out / "metrics.jsonl", self.rows)
            except OSError as e:  # the run goes on; the final write finds a way out
                self.progress.warn(f"could not write {self.out / 'metrics.jsonl'}: {e}")
