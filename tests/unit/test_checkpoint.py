"""Checkpoint folder format and the Checkpointer, one process (a fake peer stands for the rest)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from hpc_asgd.checkpoint import (
    MANIFEST,
    Checkpointer,
    check_interval,
    clean,
    complete,
    identity,
    load,
    save,
)
from hpc_asgd.comm.local import LocalComm
from hpc_asgd.config import Config
from hpc_asgd.errors import ConfigError, DataError


class PeerComm(LocalComm):
    """Rank 0 of 2: a MAX-allreduce also takes the peer's values, ``peer(t)``."""

    size = 2

    def __init__(self, peer=lambda t: t):
        super().__init__()
        self.peer, self.calls = peer, 0

    def allreduce_(self, t, op="sum"):
        assert op == "max"
        self.calls += 1
        t.copy_(torch.maximum(t, self.peer(t.clone())))


def _cfg(tmp_path: Path, **kw) -> Config:
    return Config.from_flat({"checkpoint_dir": str(tmp_path / "ck"), **kw})


def _state(step: int) -> dict:
    return {"step": step, "flat": torch.full((3,), float(step))}


def _save(cfg: Config, step: int, comm=None) -> Path:
    return save(
        Path(cfg.run.checkpoint_dir), step, comm or LocalComm(), _state(step), identity(cfg)
    )


def _steps(folders: list[Path]) -> list[int]:
    return [int(p.name.split("-")[1]) for p in folders]


def test_identity_ignores_run_control_but_not_the_trajectory(tmp_path) -> None:
    base = identity(_cfg(tmp_path))[0]
    control = {"resume": "auto", "force_resume": True, "stop_at_step": 30, "check_seconds": 5.0}
    assert (
        identity(_cfg(tmp_path / "elsewhere", out="o", checkpoint_every=20, **control))[0] == base
    )
    assert identity(_cfg(tmp_path, lr=0.01))[0] != base
    assert identity(_cfg(tmp_path, epochs=2.0))[0] != base


def test_two_runs_share_a_folder(tmp_path) -> None:
    """Run B's retention never deletes run A's checkpoints, however their steps interleave."""
    a, b = _cfg(tmp_path), _cfg(tmp_path, lr=0.01)
    for step in (40, 80, 120):
        _save(a, step)
    for step in (10, 20, 30):
        _save(b, step)
    root = tmp_path / "ck"
    assert _steps(complete(root, identity(a)[0])) == [80, 120]
    assert _steps(complete(root, identity(b)[0])) == [20, 30]
    assert _steps(complete(root)) == [20, 30, 80, 120]


def test_resume_auto_takes_only_this_runs_checkpoints(tmp_path, capsys) -> None:
    a, b = _cfg(tmp_path, resume="auto"), _cfg(tmp_path, lr=0.01, resume="auto")
    _save(a, 80)
    assert Checkpointer(b, LocalComm()).resume() is None  # B starts fresh
    assert "1 checkpoint(s) of other configurations" in capsys.readouterr().err
    _save(b, 20)
    assert Checkpointer(b, LocalComm()).resume()["step"] == 20
    assert Checkpointer(a, LocalComm()).resume()["step"] == 80


def test_explicit_resume_of_another_run_is_refused_unless_forced(tmp_path) -> None:
    a_folder = _save(_cfg(tmp_path), 80)
    b = _cfg(tmp_path, lr=0.01, resume=str(a_folder))
    with pytest.raises(ConfigError, match=r"another configuration's checkpoint .*differs in lr"):
        Checkpointer(b, LocalComm()).resume()
    forced = _cfg(tmp_path, lr=0.01, resume=str(a_folder), force_resume=True)
    assert Checkpointer(forced, LocalComm()).resume()["step"] == 80
    with pytest.raises(ConfigError, match="past this run's last"):
        Checkpointer(forced, LocalComm()).resume(total=60)


def test_uncommitted_folders_and_temp_files_of_this_run_are_cleaned(tmp_path) -> None:
    a, b = _cfg(tmp_path), _cfg(tmp_path, lr=0.01)
    kept = _save(a, 20)
    (kept / ".rank-00000.pt.abc123").write_bytes(b"half")
    torn = _save(a, 40)
    (torn / MANIFEST).unlink()  # killed before the commit
    foreign = _save(b, 40)
    (foreign / MANIFEST).unlink()  # maybe a live job writing it: not ours to delete
    clean(tmp_path / "ck", identity(a)[0])
    assert kept.is_dir() and not (kept / ".rank-00000.pt.abc123").exists()
    assert not torn.exists()
    assert foreign.is_dir()


def test_resaving_a_committed_step_uncommits_it_first(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    folder = _save(cfg, 20)

    def crash():
        raise RuntimeError("killed")

    root = tmp_path / "ck"
    with pytest.raises(RuntimeError):
        save(root, 20, LocalComm(), _state(20), identity(cfg), before_commit=crash)
    assert not (folder / MANIFEST).exists()  # never a manifest over a half-new folder


def test_malicious_or_garbage_rank_file_is_one_data_error(tmp_path) -> None:
    folder = _save(_cfg(tmp_path), 20)
    path = folder / "rank-00000.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 20, "flat": Evil()}, path)
    with pytest.raises(DataError, match="not a valid checkpoint") as e:
        load(folder, 0, 1)
    assert str(path) in str(e.value) and "weights_only" not in str(e.value)
    assert e.value.__cause__ is None  # torch's advice is not chained into a traceback either
    path.write_bytes(pickle.dumps(174812789) + os.urandom(64))
    with pytest.raises(DataError, match="not a valid checkpoint"):
        load(folder, 0, 1)
    torch.save({"step": 19, "flat": torch.zeros(3)}, path)  # another step's state
    with pytest.raises(DataError, match="no state of node step 20"):
        load(folder, 0, 1)


def test_corrupt_newest_falls_back_to_the_previous_with_a_warning(tmp_path, capsys) -> None:
    cfg = _cfg(tmp_path, resume="auto")
    _save(cfg, 20)
    newest = _save(cfg, 40)
    (newest / "rank-00000.pt").write_bytes(b"\x80\x02garbage")
    assert Checkpointer(cfg, LocalComm()).resume()["step"] == 20
    err = capsys.readouterr().err
    assert "warning" in err and str(newest / "rank-00000.pt") in err


def test_fallback_is_agreed_when_only_another_rank_fails(tmp_path) -> None:
    """This rank reads step 40 fine; the peer cannot: both go back to step 20."""
    cfg = _cfg(tmp_path, resume="auto")
    comm = PeerComm()
    _save(cfg, 20, comm)
    _save(cfg, 40, comm)
    failed_once = iter([torch.tensor([1.0])])  # the peer's failure flag at step 40

    def peer(t):
        if t.numel() == 1 and t[0] >= 0:  # a failure flag (step proposals are negated)
            return next(failed_once, t)
        return t

    comm.peer = peer
    assert Checkpointer(cfg, comm).resume()["step"] == 20
    with pytest.raises(DataError):  # no older one: every rank stops, none trains alone
        comm.peer = lambda t: torch.ones_like(t) if t.numel() == 1 and t[0] >= 0 else t
        Checkpointer(cfg, comm).resume()


def test_check_interval() -> None:
    assert check_interval(200, 20.0, 0.001) == 200  # fast steps: --check-every bounds it
    assert check_interval(200, 20.0, 0.5) == 40
    assert check_interval(200, 20.0, 90.0) == 1  # never 0: a check every node step
    assert check_interval(200, 20.0, 0.0) == 200


def test_checks_adapt_to_the_slowest_ranks_step_time(tmp_path) -> None:
    """The next check comes ``check_seconds`` of the SLOWEST rank's steps later (MAX-allreduced,
    so the same on every rank), never later than ``check_every`` steps."""
    cfg = _cfg(tmp_path, check_every=200, check_seconds=1.0)
    slow = PeerComm(peer=lambda t: torch.tensor([0.0, 0.0, 0.25]) if t.numel() == 3 else t)
    ck = Checkpointer(cfg, slow)
    ck.resume()
    assert ck.next_event(0) == 1  # the first check: one step in
    ck.at(1)
    assert slow.calls == 1 and ck.next_check == 1 + 4  # 1 s / 0.25 s per step
    assert ck.next_event(1) == 5
    assert ck.at(2) == (False, False) and slow.calls == 1  # not a check step: no collective
    fast = PeerComm()
    ck = Checkpointer(cfg, fast)
    ck.resume()
    time.sleep(0.01)
    ck.at(1)
    assert 1 < ck.next_check <= 101  # this rank's own clock counts too
    ck.checked = (ck.checked[0], time.monotonic())  # then steps become fast
    ck.at(ck.next_check)
    assert ck.next_check - ck.checked[0] == 200


def test_usr1_on_one_rank_stops_every_rank_at_the_check(tmp_path) -> None:
    cfg = _cfg(tmp_path, check_every=10)
    comm = PeerComm(peer=lambda t: torch.tensor([1.0, 0.0, 0.0]) if t.numel() == 3 else t)
    ck = Checkpointer(cfg, comm)
    ck.resume()
    assert ck.at(1) == (True, True)  # the peer saw USR1: save, then stop


def test_check_seconds_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="check_seconds: must be positive"):
        Config.from_flat({"check_seconds": 0.0}).validate(1)
