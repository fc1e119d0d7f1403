"""The Python API in a plain loop, against fake communicators (the real ranks:
tests/mpi/test_api.py): the hooks on the user's optimizer, the rounds' schedule, the budget,
zero_grad(set_to_none=True) under synchronous SGD, checkpoints, and the arguments refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hpc_asgd
from hpc_asgd.comm.local import DoneWork, LocalComm
from hpc_asgd.errors import ConfigError
from tests.unit.test_sync import FakeComm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(3, (n,), generator=g))


def _train(avg, model, opt, loader, steps: int | None = None) -> int:
    taken = 0
    for x, y in avg.iterate(loader) if steps is None else loader:
        opt.zero_grad()  # set_to_none=True, torch's default
        F.cross_entropy(model(x), y).backward()
        opt.step()
        taken += 1
        if steps is not None and taken == steps:
            break
    return taken


def test_the_public_names_load_lazily() -> None:
    assert sorted(hpc_asgd.__all__) == sorted(hpc_asgd._EXPORTS)
    import subprocess
    import sys

    code = "import sys, hpc_asgd; assert 'torch' not in sys.modules; print(hpc_asgd.LASGD)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "hpc_asgd.sync.lasgd.LASGD" in out.stdout
    assert set(hpc_asgd.__all__) >= {"init", "Comm", "LASGD", "LocalSGD", "ShardSampler"}


def test_the_hook_makes_the_rounds_every_k_optimizer_steps() -> None:
    """K-AVG's rounds fall on the optimizer's steps 4, 8, ... (after 2 warm-up rounds), each
    one collective of parameters AND BatchNorm statistics."""
    model, comm = _net(), FakeComm(2, peer_value=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(_data(), batch_size=8)
    avg = hpc_asgd.LocalSGD(model, opt, comm, period=4, warmup_steps=2)
    comm.calls.clear()  # (the start: rank 0's model broadcast)
    assert _train(avg, model, opt, loader, steps=8) == 8
    # steps 1, 2 (warm-up), then every 4: 6; the next would be 10
    assert avg.rounds == 3 and avg.clock.step == 8 and avg.clock.stop == 10
    n = sum(p.numel() for p in model.parameters()) + 8 + 8  # BatchNorm: mean and variance
    assert comm.calls == [("world", n)] * 3
    avg.finish()
    assert comm.calls[-2:] == [("world", n), ("world-bcast", n)]  # the final exact average
    opt.step()  # the hook is gone: no more rounds
    assert avg.rounds == 3


def test_the_parameters_live_in_the_flat_buffer_the_rounds_average() -> None:
    model, comm = _net(), FakeComm(2, peer_value=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step changes nothing
    avg = hpc_asgd.LocalSGD(model, opt, comm, period=1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 4)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()  # the round: mean of 3 (here) and 1 (the peer), in the user's own tensors
    assert all(torch.all(p == 2.0) for p in model.parameters())
    assert avg.flat.params.data_ptr() == next(model.parameters()).data_ptr()


def test_sync_sgd_averages_gradients_after_zero_grad_set_to_none() -> None:
    """zero_grad(set_to_none=True) leaves each parameter a gradient tensor of its own after
    backward; the pre-hook gathers them into the flat buffer, averages, and the optimizer's
    step applies the mean."""
    model, comm = _net(), FakeComm(2, peer_value=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = hpc_asgd.SyncSGD(model, opt, comm)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(3, (8,))).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.allclose(p, b - 0.1 * (g + 0.5) / 2)  # the mean of ours and the peer's
        assert p.grad.data_ptr() >= avg.flat.grad.data_ptr()  # a view of the flat buffer again
    assert avg.rounds == 1


def test_iterate_cycles_epochs_until_the_budget_and_reshuffles() -> None:
    data = _data(64)
    comm = LocalComm()
    sampler = hpc_asgd.ShardSampler.of(data, comm, batch_size=16, seed=3)
    loader = DataLoader(data, batch_sampler=sampler)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    avg = hpc_asgd.LASGD(model, opt, comm, period=2, steps=10)  # 4 batches an epoch
    first = list(sampler)
    assert _train(avg, model, opt, loader) == 10 and avg.should_stop()
    assert sampler.current_epoch == 2 and list(sampler) != first  # epoch 2's order
    avg.finish()
    s = avg.stats()
    assert s["steps"] == 10 and s["budget_spent"] and s["rounds"] == avg.rounds > 0


def test_shards_are_disjoint_and_equal() -> None:
    class Rank(LocalComm):
        def __init__(self, rank: int):
            super().__init__()
            self.rank, self.size = rank, 3

    parts = [hpc_asgd.ShardSampler.of(100, Rank(r), 8, seed=5).indices(0) for r in range(3)]
    assert all(len(p) == 33 for p in parts)
    assert len(set(torch.cat(parts).tolist())) == 99


def test_state_dict_resumes_the_schedule() -> None:
    comm = FakeComm(2, peer_value=0.0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(_data(), batch_size=8)
    avg = hpc_asgd.LocalSGD(model, opt, comm, period=3)
    _train(avg, model, opt, loader, steps=7)
    state = avg.state_dict()
    assert state == {"step": 7, "rounds": 2}
    again = hpc_asgd.LocalSGD(_net(), None, comm, period=3)
    again.load_state_dict(state)
    assert again.clock.step == 7 and again.clock.stop == 9 and again.rounds == 2


def test_an_error_in_the_block_runs_no_collective() -> None:
    comm = FakeComm(2)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match="boom"), hpc_asgd.LocalSGD(model, opt, comm, period=2):
        comm.calls.clear()
        raise RuntimeError("boom")
    assert comm.calls == []  # no final average a peer would never join
    assert not opt._optimizer_step_post_hooks  # the hook is gone


def test_local_async_runs_in_the_loops_own_process(monkeypatch) -> None:
    """Without worker processes its semantics hold: the ranks agree on when (here an
    agreement at every step, not paced by the step time), then snapshot, average in the
    background, and add the delta to the model that moved on; the final exact average ends it."""
    from hpc_asgd.sync import local_async

    for pace in ("_AGREE_START", "_AGREE_EVERY", "_AGREE_MAX"):
        monkeypatch.setattr(local_async, pace, 0.0)

    class Agreeing(FakeComm):
        def iallreduce_(self, t, op="sum"):
            if op == "max":  # the agreement on [node steps, still training, -step time]
                return DoneWork()
            return super().iallreduce_(t, op)

    model, comm = _net(), Agreeing(2, peer_value=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(_data(), batch_size=8)
    avg = hpc_asgd.LocalAsync(model, opt, comm, period=2, steps=8)
    assert _train(avg, model, opt, loader) == 16  # the job's budget: 8 x 2 ranks
    # an agreement posted at one step completes at the next; a round at the step after that
    # (the crossing of a multiple of K) completes at the next step again
    assert avg.rounds >= 3
    avg.finish()
    assert avg.over


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m, c: hpc_asgd.LASGD(m, torch.optim.SGD(_net().parameters(), lr=0.1), c,
                                     period=4), "optimizer: 6 of its 6 parameters are not"),
        (lambda m, c: hpc_asgd.LASGD(m, None, c, period=0), "period: must be a positive"),
        (lambda m, c: hpc_asgd.LASGD(m, "adam", c, period=2), "optimizer: expected a torch"),
        (lambda m, c: hpc_asgd.LocalSGD(nn.ReLU(), None, c, period=2), "no parameters"),
        (lambda m, c: hpc_asgd.LocalSGD(m.double(), None, c, period=2), "must be float32"),
        (lambda m, c: hpc_asgd.HierAvg(m, None, c, local_period=2, global_period=2,
                                       group_size=3), "group_size: 3 does not divide"),
        (lambda m, c: hpc_asgd.NoSync(m, None, c, steps=-1), "steps: must be"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line(build, message) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        build(_net(), FakeComm(4))
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_no_comm_no_init() -> None:
    with pytest.raises(ConfigError, match=r"call hpc_asgd\.init"):
        hpc_asgd.LocalSGD(_net(), None, period=2)


def test_a_checkpoint_of_your_own_goes_on_where_it_stopped(tmp_path) -> None:
    """docs/api.md's recipe: quiesce, save model + optimizer + synchroniser; rebuild, load:
    the same parameters, optimizer state and schedule."""
    comm = LocalComm()
    loader = DataLoader(_data(), batch_size=8)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    avg = hpc_asgd.LASGD(model, opt, comm, period=3)
    _train(avg, model, opt, loader, steps=5)
    avg.quiesce()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "avg": avg.state_dict()},
               path)  # fmt: skip
    model2 = _net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    avg2 = hpc_asgd.LASGD(model2, opt2, comm, period=3)
    state = torch.load(path, weights_only=True)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    avg2.load_state_dict(state["avg"])
    assert torch.equal(avg2.flat.data, avg.flat.data)  # the flat buffer took the values
    assert (avg2.clock.step, avg2.next, avg2.rounds) == (5, avg.next, avg.rounds)
    _train(avg, model, opt, loader, steps=2)
    _train(avg2, model2, opt2, loader, steps=2)
    assert torch.equal(avg2.flat.data, avg.flat.data)  # and both go on alike
