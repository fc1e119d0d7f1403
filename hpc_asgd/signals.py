"""The run's signal handlers: installed first (before torch is imported), kept until exit.

- SIGTERM (``scancel``, a time limit, Ctrl-C's cousin) raises :class:`StoppedError`, so the
  rank leaves through its cleanup path: workers stopped, the failure recorded.
- SIGUSR1 (SLURM's warning before preemption, ``--signal=B:USR1@120``) only sets a flag; the
  ranks agree on it at their next check (``Checkpointer.at``), checkpoint and exit 85.

A USR1 that arrives while the data loads or the model is built is therefore not lost (with the
default action it would kill the rank with nothing saved, and SLURM would not requeue it).
"""

from __future__ import annotations

import signal
from typing import Any, TypedDict


class _State(TypedDict):
    usr1: bool
    installed: bool
    old: dict[signal.Signals, Any]  # the handlers ``install`` replaced


_state: _State = {"usr1": False, "installed": False, "old": {}}


class StoppedError(Exception):
    """SIGTERM: leave through the cleanup path (workers stopped), as Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise StoppedError("stopped by SIGTERM")


def _on_usr1(signum, frame):
    _state["usr1"] = True


def usr1_seen() -> bool:
    """A SIGUSR1 has arrived since the handlers were installed."""
    return _state["usr1"]


def install() -> bool:
    """Install both handlers; False if they already were (then ``restore`` is not ours)."""
    if _state["installed"]:
        return False
    _state["old"] = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
        signal.SIGUSR1: signal.signal(signal.SIGUSR1, _on_usr1),
    }
    _state.update({"installed": True, "usr1": False})
    return True


def restore() -> None:
    """Put back the handlers ``install`` replaced (library callers of ``train.run``)."""
    for sig, old in _state["old"].items():
        signal.signal(sig, old)
    _state.update({"installed": False, "old": {}})
