"""The rounds' outer optimizer and the 16-bit payload, against fake communicators: plain
averaging stays bitwise, one outer Nesterov step by hand, the non-blocking semantics, error
feedback over many rounds, and the configurations refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpc_asgd.config import Config
from hpc_asgd.errors import ConfigError
from hpc_asgd.flat import FlatModel
from hpc_asgd.rules import Hogwild
from hpc_asgd.sync import LASGD, HierAvg, LocalAsync, LocalSGD
from hpc_asgd.sync.outer import OuterSGD
from hpc_asgd.sync.payload import Payload
from hpc_asgd.sync.rounds import AsyncRound
from tests.unit.test_sync import FakeComm


def _flat(value: float | None = None) -> tuple[FlatModel, Hogwild]:
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    if value is not None:
        flat.data.fill_(value)
    return flat, Hogwild(flat.params)


@pytest.mark.parametrize("cls", [LocalSGD, LASGD, LocalAsync])
def test_outer_lr_1_momentum_0_is_plain_averaging(cls) -> None:
    """lr 1, momentum 0: no outer state at all, the rounds of today."""
    flat, rule = _flat()
    s = cls(flat, None, FakeComm(2), rule=rule, period=4, outer_lr=1.0, outer_momentum=0.0)
    assert s.outer is None and s.payload is None
    h = HierAvg(_flat()[0], None, FakeComm(2), local_period=2, global_period=2, group_size=1,
                outer_lr=1.0)  # fmt: skip
    assert h.outer is None


def test_a_plain_outer_step_gives_the_average_bitwise() -> None:
    """The outer path with lr 1 (the payload's, which keeps x_g) lands on the mean's bits,
    blocking and non-blocking."""
    comm = FakeComm(2, peer_value=0.3)
    ours, base = (LocalSGD(_flat()[0], None, comm, period=1) for _ in range(2))
    ours.outer = OuterSGD()
    ours.outer.start(ours.flat.params)
    for s in (ours, base):
        s.flat.data.mul_(1.7)
        s.step_done(1)
    assert torch.equal(ours.flat.data, base.flat.data)
    flats = [_flat(), _flat()]
    rounds = [
        AsyncRound(comm, f, r, outer=o) for (f, r), o in zip(flats, [OuterSGD(), None], strict=True)
    ]
    rounds[0].outer.start(flats[0][0].params)
    for r, (f, _) in zip(rounds, flats, strict=True):
        r.start(finished=False, step=1)
        f.data.add_(0.01)  # a step while the round is in flight
        assert r.test()
        r.apply()
    assert torch.equal(flats[0][0].data, flats[1][0].data)


def test_one_outer_nesterov_step_by_hand() -> None:
    """x_g = 1 (the start); the ranks at 2 and 4: mean 3, delta = 1 - 3 = -2, v = -2,
    Nesterov step = delta + 0.9 v = -3.8, x_g = 1 - 0.5 * -3.8 = 2.9. Then at 3 and 5: mean 4,
    delta = -1.1, v = 0.9 * -2 - 1.1 = -2.9, step = -1.1 + 0.9 * -2.9 = -3.71, x_g = 4.755."""
    flat, rule = _flat(1.0)
    s = LocalSGD(flat, None, FakeComm(2, peer_value=4.0), rule=rule, period=1,
                 outer_lr=0.5, outer_momentum=0.9, outer_nesterov=True)  # fmt: skip
    p = flat.n_params
    flat.data.fill_(2.0)
    s.step_done(1)
    assert torch.allclose(flat.params, torch.full((p,), 2.9))
    assert torch.allclose(flat.data[p:], torch.full_like(flat.data[p:], 3.0))  # buffers: mean
    s.comm.peer_value = 5.0
    flat.data.fill_(3.0)
    s.step_done(2)
    assert torch.allclose(flat.params, torch.full((p,), 4.755))
    assert torch.allclose(s.outer.v, torch.full((p,), -2.9))


def test_non_blocking_outer_step_keeps_the_steps_taken_meanwhile() -> None:
    """LASGD, x_g = 1: the snapshot x_s = 2 and the peer's 4 average to 3, delta = 1 - 3 = -2,
    at lr 0.5 x_g' = 2; the live model moved on by +0.25 while the round was in flight, so it
    ends at x_g' + (x - x_s) = 2.25."""
    flat, rule = _flat(1.0)
    s = LASGD(flat, None, FakeComm(2, peer_value=4.0), rule=rule, period=1, outer_lr=0.5)
    flat.data.fill_(2.0)
    s.poll(1)  # posts the round (the fake completes it at once)
    flat.params.add_(0.25)
    s.poll(2)  # applies it, then posts the next
    assert s.rounds == 1
    assert torch.allclose(flat.params, torch.full((flat.n_params,), 2.25))
    assert torch.allclose(s.outer.x_g, torch.full((flat.n_params,), 2.0))


def test_error_feedback_loses_one_rounding_over_many_rounds() -> None:
    """A fixed change sent 1000 times in bf16: with the residual fed back, the sum of what was
    sent is the float32 sum within one bf16 rounding; without, the error grows every round."""
    torch.manual_seed(0)
    v = torch.randn(512) * 1e-3
    x_g = torch.zeros(512)
    payload = Payload("bf16", 512)
    sent = torch.zeros(512, dtype=torch.float64)
    for _ in range(1000):
        sent += payload.pack(v, x_g).to(torch.float64)
    exact = 1000 * v.to(torch.float64)
    one_rounding = (v - v.to(torch.bfloat16).float()).abs().max().item() + 1e-12
    assert (sent - exact).abs().max().item() <= one_rounding
    naive = 1000 * v.to(torch.bfloat16).to(torch.float64)
    assert (naive - exact).abs().max().item() > 100 * one_rounding


def test_the_payload_round_averages_the_change_since_the_global_model() -> None:
    flat, rule = _flat(1.0)
    s = LocalSGD(flat, None, FakeComm(2, peer_value=0.5), rule=rule, period=1, avg_dtype="bf16")
    assert s.payload is not None and s.outer is not None and s.outer.plain
    comm = s.comm
    comm.calls.clear()
    flat.data.fill_(1.5)  # the change since x_g = 1: 0.5; the fake peer adds 0.5 to the sum
    s.step_done(1)
    assert torch.allclose(flat.params, torch.full((flat.n_params,), 1.5))  # 1 + (0.5+0.5)/2
    assert comm.calls == [("world", flat.n_params), ("world", flat.n_buffers)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"algo": "local-sgd", "outer_momentum": 1.0}, "outer_momentum: must be in [0, 1)"),
        ({"algo": "lasgd", "outer_lr": 0.0}, "outer_lr: must be a positive number"),
        ({"algo": "lasgd", "outer_lr": float("nan")}, "outer_lr: must be a finite number"),
        ({"algo": "local-sgd", "outer_nesterov": True}, "outer_nesterov: needs outer_momentum"),
        ({"algo": "sync", "avg_dtype": "bf16"}, "avg_dtype: only for the model-averaging"),
        ({"algo": "none", "outer_lr": 0.7}, "outer_lr: only for the model-averaging"),
        ({"algo": "lasgd", "avg_dtype": "bf16", "comm": "horovod"}, "no bfloat16 allreduce"),
        ({"algo": "lasgd", "avg_dtype": "int8"}, "avg_dtype: unknown value 'int8'"),
    ],
)
def test_bad_outer_and_payload_settings(flags, message) -> None:
    with pytest.raises(ConfigError) as e:
        Config.from_flat(flags).validate(world_size=2)
    assert message in str(e.value)
