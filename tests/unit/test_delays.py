"""Injected delays (``hpc_asgd.delays``): reproducible draws of the asked mean, the one-off
pause at the right step on the right rank, and the flags' validation."""

from __future__ import annotations

import pytest
import torch

from hpc_asgd.config import Config
from hpc_asgd.delays import Delays, parse_delay
from hpc_asgd.errors import ConfigError


def delays(rank: int = 0, worker: int = 0, **flags) -> tuple[Delays | None, list[float]]:
    """The Delays of ``rank``/``worker`` under ``flags``, sleeping into a list."""
    slept: list[float] = []
    cfg = Config.from_flat(flags)
    cfg.validate(world_size=4)
    return Delays.from_config(cfg, rank, worker, sleep=slept.append), slept


@pytest.mark.parametrize("spec", ["exp:5", "lognormal:5", "lognormal:5:0.5"])
def test_draws_are_reproducible_with_the_asked_mean(spec: str) -> None:
    a, slept = delays(delay=spec, seed=3)
    b, _ = delays(delay=spec, seed=3)
    assert a is not None and b is not None
    torch.manual_seed(0)
    before = torch.rand(3)
    for s in range(2000):
        a.after(s)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), before)  # torch's RNG stream is untouched
    assert slept == [b.after(s) for s in range(2000)]  # the same sequence again
    mean = sum(slept) / len(slept)
    assert 0.0045 < mean < 0.0055, mean  # 5 ms; the sample mean's sd is ~0.1-0.15 ms here
    assert a.slept_s == pytest.approx(sum(slept))


def test_ranks_workers_and_seeds_draw_differently() -> None:
    seqs = []
    for rank, worker, seed in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
        d, _ = delays(rank, worker, delay="exp:5", seed=seed)
        assert d is not None
        seqs.append([d.draw() for _ in range(5)])
    assert len({tuple(s) for s in seqs}) == 4


def test_the_pause_comes_once_at_its_step_on_its_rank_only() -> None:
    flags = {"pause_rank": 1, "pause_at": 10, "pause_s": 2.5}
    assert delays(0, **flags)[0] is None  # not the pausing rank: nothing to inject
    d, slept = delays(1, **flags)
    assert d is not None
    took = [d.after(s) for s in range(20)]  # node steps 1..20 (0-based s)
    assert took == [0.0] * 9 + [2.5] + [0.0] * 10  # node step 10 is s = 9
    assert slept == [2.5] and d.after(9) == 0.0  # once, even if step s = 9 came again
    # with W workers, only the worker that takes node step 10 pauses
    other, slept2 = delays(1, worker=1, **flags)
    assert other is not None
    for s in (3, 11, 12):  # worker 1 took other steps
        other.after(s)
    assert slept2 == []
    # with --delay as well: the pause adds to that step's random delay
    d, slept = delays(1, delay="exp:1", **flags)
    assert d is not None
    took = [d.after(s) for s in range(12)]
    assert took[9] > 2.5 and all(t < 2.5 for i, t in enumerate(took) if i != 9)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"delay": "foo"},
            r"delay: expected exp:MEAN_MS or lognormal:MEAN_MS\[:SIGMA\], got 'foo'",
        ),
        ({"delay": "gamma:5"}, "delay: expected exp:MEAN_MS"),
        ({"delay": "exp:5:1"}, "delay: expected exp:MEAN_MS"),  # exp has no sigma
        ({"delay": "exp:abc"}, "delay: expected exp:MEAN_MS"),
        ({"delay": "exp:-5"}, "delay: the mean must be a positive number of ms, got 'exp:-5'"),
        ({"delay": "exp:nan"}, "delay: the mean must be a positive"),
        ({"delay": "lognormal:5:inf"}, "delay: the log-normal sigma"),
        ({"pause_rank": 4, "pause_at": 1, "pause_s": 1.0}, "pause_rank: 4 is not a rank"),
        ({"pause_rank": -2}, "pause_rank: -2 is not a rank"),
        ({"pause_rank": 1, "pause_at": 5}, "pause_s: --pause-rank needs a pause of > 0 s"),
        ({"pause_rank": 1, "pause_s": 1.0}, "pause_at: node steps count from 1, got 0"),
        ({"pause_s": 1.0}, "pause_rank: --pause-at / --pause-s need --pause-rank"),
        (
            {"pause_rank": 0, "pause_at": 1, "pause_s": 30.0, "comm_timeout": 20.0},
            "pause_s: a 30 s pause would trip the stall deadline",
        ),
    ],
)
def test_validation_names_the_field(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_flat(flags).validate(world_size=4)


def test_parse() -> None:
    assert parse_delay("") is None
    assert parse_delay("exp:5") == ("exp", 0.005, 1.0)
    assert parse_delay("lognormal:20:0.5") == ("lognormal", 0.02, 0.5)


def test_stepper_sleeps_after_the_step_and_counts_its_cpu() -> None:
    """Wired into the Stepper (both process layouts): the pause on its node step, after the
    work; the step's CPU time in the stats row."""
    from hpc_asgd.data import load_dataset
    from hpc_asgd.env import detect
    from hpc_asgd.flat import FlatModel
    from hpc_asgd.models import build_model
    from hpc_asgd.rules import make_rule
    from hpc_asgd.stats import CPU_S, NSTATS, STEPS
    from hpc_asgd.train import step_spec
    from hpc_asgd.workers import spawn_context

    cfg = Config.from_flat({"pause_rank": 1, "pause_at": 2, "pause_s": 7.0, "delay": "exp:1"})
    data = load_dataset("digits", None)
    flat = FlatModel(build_model("mlp", data.input_shape, data.num_classes))
    rule = make_rule(cfg, flat.params, spawn_context())
    rule.attach(0)
    stats = torch.zeros((1, NSTATS), dtype=torch.float64)
    spec = step_spec(cfg, data, 1, 2, detect({}))  # rank 1 of 2
    st = spec.stepper(flat, rule, stats[0], torch.device("cpu"))
    assert st.delays is not None
    slept: list[float] = []
    st.delays.sleep = slept.append
    for s in range(3):
        st.step(s)
    assert len(slept) == 3 and slept[1] > 7.0 and slept[0] < 7.0 and slept[2] < 7.0
    assert stats[0, STEPS] == 3 and stats[0, CPU_S] > 0
