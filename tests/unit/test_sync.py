"""Synchronisers against a fake communicator that records what was averaged, and when."""

from __future__ import annotations

import torch
from torch import nn

from hpc_asgd.comm.local import DoneWork
from hpc_asgd.flat import FlatModel
from hpc_asgd.sync import HierAvg, LocalSGD, NoSync, SyncSGD


class FakeComm:
    """Pretends to be one of ``size`` ranks whose peers hold ``peer_value`` everywhere."""

    name = "fake"

    def __init__(self, size: int = 4, peer_value: float = 1.0, tag: str = "world"):
        self.rank, self.size, self.timeout = 0, size, 1.0
        self.peer_value, self.tag = peer_value, tag
        self.calls: list[tuple[str, int]] = []

    def allreduce_(self, t, op="sum"):
        self.calls.append((self.tag, t.numel()))
        t.add_(self.peer_value * (self.size - 1))

    def iallreduce_(self, t, op="sum"):
        self.allreduce_(t, op)
        return DoneWork()

    def bcast_(self, t, root=0):
        self.calls.append((f"{self.tag}-bcast", t.numel()))


def _flat() -> FlatModel:
    torch.manual_seed(0)
    return FlatModel(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))


def test_sync_sgd_averages_gradients_every_step() -> None:
    flat, comm = _flat(), FakeComm(4, peer_value=1.0)
    s = SyncSGD(comm, flat)
    flat.grad.fill_(5.0)
    s.grads_ready(1)
    assert torch.allclose(flat.grad, torch.full_like(flat.grad, (5 + 3) / 4))
    assert comm.calls == [("world", flat.n_params)] and s.rounds == 1


def test_local_sgd_period_and_post_local_warmup() -> None:
    flat, comm = _flat(), FakeComm(2, peer_value=0.0)
    s = LocalSGD(comm, flat, period=4, post_local_epochs=1.0)
    spe = 5
    for step in range(1, 21):
        s.step_done(step, step / spe)
    # steps 1..4 average every step (epoch < 1), then every 4 steps from step 4: 8, 12, 16, 20
    assert s.rounds == 4 + 4
    assert all(n == len(flat) for _, n in comm.calls)  # parameters AND buffers, one call


def test_hier_avg_schedule() -> None:
    flat, world, group = _flat(), FakeComm(4, tag="world"), FakeComm(2, tag="group")
    s = HierAvg(world, flat, group, local_period=2, global_period=3)
    for step in range(1, 13):
        s.step_done(step, 0.0)
    # group rounds at 2, 4, 8, 10; global at 6, 12
    assert [c for c, _ in group.calls] == ["group"] * 4 and s.group_rounds == 4
    assert [c for c, _ in world.calls] == ["world"] * 2 and s.rounds == 2


def test_final_average_then_broadcast_for_consensus() -> None:
    flat, comm = _flat(), FakeComm(2)
    LocalSGD(comm, flat, period=3).finish()
    assert [c for c, _ in comm.calls] == ["world", "world-bcast"]
    comm.calls.clear()
    NoSync(comm, flat).finish()
    assert comm.calls == []  # no consensus promised, nothing averaged
