"""Synchronisers against a fake communicator that records what was averaged, and when."""

from __future__ import annotations

import torch
from torch import nn

from hpc_asgd.comm.local import DoneWork
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules import Hogwild
from hpc_asgd.sync import LASGD, HierAvg, LocalSGD, NoSync, SyncSGD


class FakeComm:
    """Pretends to be one of ``size`` ranks whose peers hold ``peer_value`` everywhere."""

    name = "fake"

    def __init__(self, size: int = 4, peer_value: float = 1.0, tag: str = "world"):
        self.rank, self.size, self.timeout = 0, size, 1.0
        self.peer_value, self.tag = peer_value, tag
        self.world_ranks = list(range(size))
        self.calls: list[tuple[str, int]] = []

    def allgather(self, t):  # the peers hold the same model (the constructor's check)
        return t.unsqueeze(0).repeat(self.size, *([1] * t.dim()))

    def split(self, color, key):
        return self

    def allreduce_(self, t, op="sum"):
        self.calls.append((self.tag, t.numel()))
        t.add_(self.peer_value * (self.size - 1))

    def iallreduce_(self, t, op="sum"):
        self.allreduce_(t, op)
        return DoneWork()

    def bcast_(self, t, root=0):
        self.calls.append((f"{self.tag}-bcast", t.numel()))


def _flat() -> tuple[FlatModel, Hogwild]:
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    return flat, Hogwild(flat.params)


def _built(cls, comm, flat, rule, **kw):
    """The synchroniser over ``flat``; what its construction sent (the start) forgotten."""
    s = cls(flat, None, comm, rule=rule, **kw)
    comm.calls.clear()
    return s


def _drive(sync, total: int) -> list[int]:
    """The driver's loop: rounds happen exactly at the stops the synchroniser names."""
    stops, stop = [], sync.next_stop(0)
    for step in range(1, total + 1):
        if step == stop:
            sync.step_done(stop)
            stops.append(stop)
            stop = sync.next_stop(stop)
    return stops


def test_sync_sgd_averages_gradients_every_step() -> None:
    (flat, rule), comm = _flat(), FakeComm(4, peer_value=1.0)
    s = _built(SyncSGD, comm, flat, rule)
    flat.grad.fill_(5.0)
    s.grads_ready(1)
    assert torch.allclose(flat.grad, torch.full_like(flat.grad, (5 + 3) / 4))
    assert comm.calls == [("world", flat.n_params)] and s.rounds == 1
    assert s.averages_gradients and s.next_stop(0) is None


def test_local_sgd_period_and_post_local_warmup() -> None:
    (flat, rule), comm = _flat(), FakeComm(2, peer_value=0.0)
    s = _built(LocalSGD, comm, flat, rule, period=4, warmup_steps=5)
    # the first 5 steps (--post-local-epochs 1 at 5 steps per epoch): every step; then every 4
    assert _drive(s, 20) == [1, 2, 3, 4, 5, 9, 13, 17]
    assert s.rounds == 8
    assert all(n == len(flat) for _, n in comm.calls)  # parameters AND buffers, one call


def test_local_sgd_averages_in_place() -> None:
    (flat, rule), comm = _flat(), FakeComm(2, peer_value=3.0)
    flat.data.fill_(1.0)
    _built(LocalSGD, comm, flat, rule, period=1).step_done(1)
    assert torch.all(flat.data == 2.0)  # mean of 1 (here) and 3 (the peer)


def test_hier_avg_schedule() -> None:
    (flat, rule), world, group = _flat(), FakeComm(4, tag="world"), FakeComm(2, tag="group")
    s = _built(HierAvg, world, flat, rule, group=group, local_period=2, global_period=3)
    assert _drive(s, 12) == [2, 4, 6, 8, 10, 12]
    # group rounds at 2, 4, 8, 10; global at 6, 12
    assert [c for c, _ in group.calls] == ["group"] * 4 and s.group_rounds == 4
    assert [c for c, _ in world.calls] == ["world"] * 2 and s.rounds == 2


def test_hier_avg_lists_its_groups() -> None:
    """The summary's ``groups``: each rank gives its group's first world rank; here the groups
    are two nodes with interleaved ranks (as ``split_node`` makes them from host names)."""

    class World(FakeComm):
        world_ranks = (0, 1, 2, 3)

        def allgather(self, t):
            if t.numel() == 3:  # the constructor's check of the model: the same everywhere
                return super().allgather(t)
            assert t.tolist() == [0]  # this rank's group starts at world rank 0
            return torch.tensor([[0], [1], [0], [1]])  # what ranks 0..3 gave

    (flat, rule), group = _flat(), FakeComm(2, tag="group")
    group.world_ranks = [0, 2]
    s = _built(HierAvg, World(4), flat, rule, group=group, local_period=2, global_period=3)
    assert s.members == [0, 2] and s.groups() == [[0, 2], [1, 3]]


def test_final_average_then_broadcast_for_consensus() -> None:
    (flat, rule), comm = _flat(), FakeComm(2)
    _built(LocalSGD, comm, flat, rule, period=3).finish()
    assert [c for c, _ in comm.calls] == ["world", "world-bcast"]
    _built(NoSync, comm, flat, rule).finish()
    assert comm.calls == []  # no consensus promised, nothing averaged


def test_lasgd_settle_rounds_until_every_rank_finished_then_reopens() -> None:
    """--keep-training: a finished rank's rounds (flag 1) complete while its peer still trains
    (flag 0): settle stays False and each round's delta reaches the live model; the first round
    whose flags sum to the world size ends the stream, and the next drain re-opens it."""

    class Peer(FakeComm):
        finished = 0.0

        def split(self, color, key):
            return self

        def iallreduce_(self, t, op="sum"):
            t[:-2].add_(self.peer_value)
            t[-2] += self.finished  # the peer's "finished" flag (then its node steps)
            return DoneWork()

    (flat, rule), comm = _flat(), Peer(2, peer_value=3.0)
    s = _built(LASGD, comm, flat, rule, period=4)
    flat.data.fill_(1.0)
    assert not s.settle(100)  # posts a round flagged finished (the fake completes it at once)
    assert not s.settle(101)  # applies it: the peer still trains
    assert torch.all(flat.data == 2.0) and s.rounds == 1  # x += mean(1, 3) - 1
    comm.finished = 1.0
    assert not s.settle(102)  # the next round, posted
    assert s.settle(103) and s.rounds == 2  # every rank finished: over
    assert s.settle(104)  # and it stays over: no more rounds posted
    s.drain(104)
    assert s.rounds == 2 and not s.round.closed  # drained at once, the stream is open again


def test_budget_stops_on_a_lower_bound_of_the_jobs_steps() -> None:
    """--budget job: a rank stops once the last round's sum of the ranks' steps, plus its own
    steps since it posted that round, reach the budget; the LR offset follows the average."""
    from hpc_asgd.sync.rounds import Budget

    b = Budget()
    b.steps, b.world = 100, 2
    b.begin(10, minutes=0.0, train_before=0.0)  # resumed at node step 10 on both ranks
    assert not b.spent(89)  # 20 + 79 own steps: below 100
    assert b.spent(90) and b.ended_by == "steps"
    b = Budget()
    b.steps, b.world = 100, 2
    b.begin(0, 0.0, 0.0)
    b.record(60.0, at_post=20)  # we had 20 when we posted; the peer 40
    assert b.offset[0] == 10.0  # the job is 30 node steps in on average, we were at 20
    assert not b.spent(59) and b.spent(60)  # 60 + (60 - 20) = 100
    b.record(10.0, at_post=0)  # once spent, it stays spent
    assert b.spent(1)
    t = Budget()  # rank mode: no step budget, a time budget already spent (resumed run)
    t.begin(0, minutes=1.0, train_before=61.0)
    assert t.spent(0) and t.ended_by == "time" and t.offset[0] == 0.0


def test_lasgd_quiesce_keeps_the_post_local_warm_up() -> None:
    """A checkpoint during the warm-up (K = 1 for the first steps) leaves the next round one
    step away, as a straight run has it, not K (the schedule used to restart with K), and a
    resumed run takes that schedule from the checkpoint."""
    # peer_value 1: the peer's "finished" flag adds up with ours, so the drain ends
    (flat, rule), comm = _flat(), FakeComm(2, peer_value=1.0)
    s = _built(LASGD, comm, flat, rule, period=4, warmup_steps=10)
    s.quiesce(3)
    assert s.next == 4
    s.quiesce(12)  # past the warm-up: K again
    assert s.next == 16
    again = _built(LASGD, comm, *_flat(), period=4, warmup_steps=10)
    again.load_state_dict(s.state_dict())
    assert again.next == 16
