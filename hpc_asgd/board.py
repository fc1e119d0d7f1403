"""``--tensorboard DIR``: rank 0 writes TensorBoard scalars (torch's ``SummaryWriter``; the
optional ``tensorboard`` package, the ``log`` extra), as torchft's examples and torchtitan do.

At every evaluation row (``--eval-every``: the same rows as ``metrics.jsonl``, x = rank 0's node
step): ``train/loss`` (since the previous row, all ranks), ``test/accuracy``, ``test/loss``,
``train/lr`` (the schedule at the row's epoch), ``train/epoch``, ``train/samples_per_s`` (all
ranks, between rows), and rank 0's ``comm/rounds``, ``comm/wait_s`` and ``comm/overlap``. At the
end, per rank r: ``rank/comm_wait_s/r``, ``rank/comm_overlap/r``, ``rank/steps_taken/r`` and
``rank/nonfinite_steps/r``, the workers' ``workers/staleness_mean`` (updates in between, W > 1),
a text entry with the configuration (as the TOML ``--config`` reads back) and one with the
summary. Off (the default), nothing of it runs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from hpc_asgd.errors import ConfigError

INSTALL = "tensorboard: --tensorboard needs the tensorboard package: pip install 'hpc_asgd[log]'"


def check_installed() -> None:
    """ConfigError unless ``tensorboard`` can be imported (checked before any engine starts)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(INSTALL)


class Board:
    """Rank 0's TensorBoard writer; :meth:`row` per evaluation, :meth:`close` with the summary."""

    def __init__(self, folder: Path, config_toml: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard absent, or too old for torch
            raise ConfigError(INSTALL) from None
        self.writer = SummaryWriter(log_dir=str(folder))
        # a Markdown code block, so that TensorBoard's text tab keeps the lines
        self.writer.add_text("config", "```toml\n" + config_toml + "```", 0)
        self.last: tuple[float, int] | None = None  # (time_s, samples) of the previous row

    def row(self, step: int, row: dict, lr: float, sync: dict[str, Any]) -> None:
        add = self.writer.add_scalar
        for tag, key in (
            ("train/loss", "train_loss"),
            ("test/accuracy", "test_acc"),
            ("test/loss", "test_loss"),
            ("train/epoch", "epoch"),
        ):
            add(tag, row[key], step)
        add("train/lr", lr, step)
        t, samples = row["time_s"], row["samples"]
        if self.last is not None and t > self.last[0]:
            add("train/samples_per_s", (samples - self.last[1]) / (t - self.last[0]), step)
        self.last = (t, samples)
        add("comm/rounds", sync["rounds"], step)
        add("comm/wait_s", sync["comm_wait_s"], step)
        if sync.get("comm_overlap") is not None:
            add("comm/overlap", sync["comm_overlap"], step)
        self.writer.flush()

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            step = max(summary.get("steps_taken") or [0])
            for name in ("comm_wait_s", "comm_overlap", "steps_taken", "nonfinite_steps"):
                values = summary.get(name)
                for r, v in enumerate(values if isinstance(values, list) else []):
                    if isinstance(v, int | float):
                        self.writer.add_scalar(f"rank/{name}/{r}", v, step)
            hist = (summary.get("workers") or {}).get("staleness_hist")
            if hist and sum(hist):  # bins 0..14 and >= 15 updates in between
                mean = sum(i * n for i, n in enumerate(hist)) / sum(hist)
                self.writer.add_scalar("workers/staleness_mean", mean, step)
            text = json.dumps(summary, indent=1, default=str)
            self.writer.add_text("summary", "```json\n" + text + "\n```", step)
        self.writer.close()
