"""Unit tests of the flat model, the optimizer, schedules, config, env and CLI contract."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from hpc_asgd import env
from hpc_asgd.cli import build_parser, config_from_args
from hpc_asgd.config import Config
from hpc_asgd.errors import ConfigError
from hpc_asgd.flat import FlatModel
from hpc_asgd.models import build_model
from hpc_asgd.optim import FlatSGD, Schedule


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_flat_model_views_params_buffers_and_grads() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flat = FlatModel(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # values survive flattening
    n_params = sum(p.numel() for p in net.parameters())
    assert flat.n_params == n_params and flat.n_buffers == 8  # BN running mean + var
    # a write to the flat buffer is a write to the module
    flat.data.add_(1.0)
    assert torch.equal(net[0].weight, before["0.weight"] + 1)
    assert torch.equal(net[1].running_mean, before["1.running_mean"] + 1)
    # backward accumulates into views of flat.grad; BN's forward updates its stats in place
    x = torch.randn(5, 1, 8, 8)
    net(x).sum().backward()
    assert flat.grad.abs().sum() > 0
    for p in net.parameters():
        assert p.grad.data_ptr() >= flat.grad.data_ptr()
        assert p.grad.data_ptr() < flat.grad.data_ptr() + flat.grad.numel() * 4
    assert not torch.equal(flat.data[n_params : n_params + 4], before["1.running_mean"] + 1)


def test_bind_params_switches_between_version_slots_and_fresh_tensors() -> None:
    """Leashed-SGD's workers rebind to one of a pool's slots every step (cached views): the
    module must compute with the slot bound last, and a fresh tensor is not cached."""
    net = _net()
    flat = FlatModel(net)
    x = torch.randn(2, 1, 8, 8)
    net.eval()
    pool = torch.stack([flat.params.clone(), flat.params.clone() * 0.5])  # (2, n_params)
    outs = []
    for slot in (0, 1, 0, 1):
        flat.bind_params(pool[slot])
        outs.append(net(x))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    assert not torch.equal(outs[0], outs[1])
    pool[1].mul_(2.0)  # slot 1 now holds the original parameters again, in place
    flat.bind_params(pool[1])
    assert torch.equal(net(x), outs[0])
    fresh = flat.params.clone()  # not a view: bound, never cached
    flat.bind_params(fresh)
    assert torch.equal(net(x), outs[0]) and fresh.data_ptr() not in flat._views
    flat.bind_params(flat.params)
    assert net[0].weight.data_ptr() == flat.data.data_ptr()


@pytest.mark.parametrize(
    ("momentum", "nesterov", "wd"), [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 1e-3)]
)
def test_flat_sgd_matches_torch_sgd(momentum: float, nesterov: bool, wd: float) -> None:
    a, b = _net(), _net()
    flat = FlatModel(a)
    ref = torch.optim.SGD(
        b.parameters(), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd
    )
    opt = FlatSGD(momentum, wd, nesterov)
    for i in range(4):
        x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(i))
        flat.zero_grad()
        a(x).pow(2).mean().backward()
        opt.step(flat.params, flat.grad, 0.05)
        ref.zero_grad()
        b(x).pow(2).mean().backward()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), (pa - pb).abs().max()


def test_schedules() -> None:
    s = Schedule(lr=0.4, epochs=10, kind="cosine", warmup_epochs=5, warmup_lr=0.1)
    assert (
        s(0) == pytest.approx(0.1) and s(2.5) == pytest.approx(0.25) and s(5) == pytest.approx(0.4)
    )
    assert s(7.5) == pytest.approx(0.2) and s(10) == pytest.approx(0.0, abs=1e-12)
    st = Schedule(lr=1.0, epochs=10, kind="step", milestones=(3, 6), gamma=0.1)
    assert [st(e) for e in (0, 3, 6)] == pytest.approx([1.0, 0.1, 0.01])
    assert Schedule(lr=0.3, epochs=2)(1.7) == 0.3
    # a rank's estimate of the job's progress can be negative early on (--budget job): the
    # schedule's start, never a 0/0 rate (a CI run diverged on it)
    neg = np.float64(-0.25)
    assert Schedule(lr=0.3, epochs=2)(neg) == 0.3 and s(neg) == pytest.approx(0.1)


def test_config_validation_messages() -> None:
    Config().validate(world_size=2)
    cases = [
        ({"algo": "x"}, 1, "algo: unknown value 'x'"),
        ({"period": 0}, 1, "period: must be a positive integer"),
        ({"lr": -1}, 1, "lr: must be positive"),
        ({"momentum": 1.0}, 1, "momentum: must be below 1"),
        (
            {"algo": "hier-avg", "group_size": 3},
            4,
            "group_size: 3 does not divide the world size 4",
        ),
        ({"algo": "hier-avg"}, 4, None),  # default group: one node (local_size=4 below)
        ({"slow_rank": 5}, 2, "slow_rank: 5 is not a rank"),
        ({"comm": "carrier-pigeon"}, 1, "comm: unknown value"),
        ({"algo": "sync", "keep_training": True}, 2, "keep_training: only the non-blocking"),
        ({"algo": "hier-avg", "keep_training": True}, 2, r"not 'hier-avg' \(blocking\)"),
        (
            {"algo": "lasgd", "keep_training": True, "budget": "rank", "lr_schedule": "cosine"},
            2,
            "keep_training: the cosine schedule ends at lr 0",
        ),
        ({"algo": "lasgd", "keep_training": True, "budget": "rank"}, 2, None),
        ({"algo": "lasgd", "keep_training": True}, 2, "keep_training: --budget job .* already"),
        ({"algo": "lasgd", "lr_schedule": "cosine"}, 2, None),  # the job's progress ends it
        ({"budget": "node"}, 2, "budget: unknown value 'node'; choose one of job, rank"),
        ({"algo": "lasgd", "time_budget": -1.0}, 2, "time_budget: must be >= 0"),
        ({"algo": "sync", "time_budget": 5.0}, 2, "time_budget: 'sync' meets its peers"),
        ({"algo": "hier-avg", "time_budget": 5.0}, 2, "time_budget: 'hier-avg' meets"),
        ({"algo": "none", "time_budget": 5.0}, 2, None),
        (
            {"algo": "hier-avg", "hier_mode": "nonblocking", "group_size": 1, "time_budget": 5.0},
            2,
            None,
        ),
    ]
    for values, world, message in cases:
        cfg = Config.from_flat(values)
        if message is None:
            cfg.validate(world, local_size=4)
            continue
        with pytest.raises(ConfigError, match=message):
            cfg.validate(world)
    with pytest.raises(ConfigError, match="unknown field"):
        Config.from_flat({"learning_rate": 1})
    with pytest.raises(ConfigError, match="period = 'abc' is not of type int"):
        Config.from_flat({"period": "abc"})


def test_cli_flags_are_frozen() -> None:
    """The contract's flags (DESIGN.md section 3) exist; slurm/ and benchmarks rely on them."""
    contract = [
        "--algo",
        "--update",
        "--workers",
        "--comm",
        "--dataset",
        "--data-dir",
        "--download",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--momentum",
        "--weight-decay",
        "--seed",
        "--device",
        "--period",
        "--post-local-epochs",
        "--group-size",
        "--local-period",
        "--global-period",
        "--persistence",
        "--slow-rank",
        "--slow-factor",
        "--comm-timeout",
        "--out",
        "--no-verify",
        "--config",
    ]
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    assert set(contract) <= flags, set(contract) - flags


def test_config_file_and_flag_precedence(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('algo = "local-sgd"\nperiod = 8\n[optim]\nlr = 0.4\nlr_milestones = [1, 2]\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--period", "3", "--no-verify"])
    cfg = config_from_args(args)
    assert (cfg.sync.algo, cfg.sync.period, cfg.optim.lr) == ("local-sgd", 3, 0.4)
    assert cfg.optim.lr_milestones == (1.0, 2.0) and cfg.data.verify is False
    assert Config.from_flat(cfg.to_dict()) == cfg  # summary.json's config round-trips
    bad = tmp_path / "bad.toml"
    bad.write_text("algo = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_args(build_parser().parse_args(["train", "--config", str(bad)]))


def test_presets_parse_and_validate() -> None:
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[2].glob("configs/*.toml")):
        cfg = Config.from_flat(Config.read_file(str(path)), source=str(path))
        assert cfg.data.dataset and cfg.model.model, path


def test_env_detection() -> None:
    single = env.detect({})
    assert (single.launcher, single.rank, single.size) == ("single", 0, 1)
    ompi = env.detect(
        {
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        }
    )
    assert (ompi.launcher, ompi.rank, ompi.size, ompi.local_rank, ompi.local_size) == (
        "mpirun",
        3,
        4,
        1,
        2,
    )
    assert ompi.under_mpi
    srun = env.detect(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS_PER_NODE": "2(x4)",
            "SLURM_JOB_NODELIST": "gpu[07-10]",
            "SLURM_JOB_ID": "1234",
        }
    )
    assert (srun.rank, srun.size, srun.local_size, srun.master_addr) == (5, 8, 2, "gpu07")
    assert srun.master_port == 21234 and not srun.under_mpi
    tr = env.detect(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    )
    assert (tr.launcher, tr.rank, tr.master_addr, tr.master_port) == ("torchrun", 1, "h", 1)
    assert env.detect({"HPC_ASGD_FAULT": "stop@1:20"}).fault == env.Fault("stop", 1, 20)
    with pytest.raises(ValueError, match="HPC_ASGD_FAULT"):
        env.detect({"HPC_ASGD_FAULT": "explode"})


def test_resnet20_fits_the_benchmark_size() -> None:
    flat = FlatModel(build_model("resnet20", (3, 32, 32), 10))
    assert math.isclose(flat.n_params, 0.27e6, rel_tol=0.01)


def test_help_shows_the_configs_real_defaults() -> None:
    """Every option's help states the configuration's default (argparse's own is None, so
    that a --config file is not overridden); switches state none, and none contradicts."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    defaults = Config().to_dict()
    by_dest = {a.dest: a for a in train._actions}
    for name, value in defaults.items():
        help_text = by_dest[name].help
        shown = re.findall(r"\(default: ([^)]*)\)", help_text)
        if isinstance(value, bool) or value in (None, []):
            assert shown == [], (name, help_text)
        else:
            assert shown == [str(value)], (name, help_text)
    assert "skip" in by_dest["verify"].help  # --no-verify says what the flag does
    # and the values a run gets without flags are those defaults
    assert config_from_args(build_parser().parse_args(["train"])).to_dict() == defaults
