"""``--min-ranks``'s refusals: one ConfigError line before any engine starts."""

from __future__ import annotations

import pytest

from hpc_asgd import elastic
from hpc_asgd.config import Config
from hpc_asgd.env import Launch
from hpc_asgd.errors import ConfigError


def launch(size: int = 4, ulfm: bool = True) -> Launch:
    return Launch("mpirun", 0, size, 0, size, "node1", None, None, None, None, ulfm=ulfm)


def cfg(**flat) -> Config:
    return Config.from_flat({"min_ranks": 2, "algo": "lasgd", **flat}, source="test")


@pytest.mark.parametrize(
    ("flat", "ulfm", "message"),
    [
        ({"comm": "gloo"}, True, "needs MPI with ULFM"),
        ({}, False, "mpirun --with-ft ulfm"),
        ({"algo": "hier-avg", "hier_mode": "nonblocking"}, True, "blocking rounds and node"),
        ({"algo": "hier-avg", "group_size": 2}, True, "a fixed size need not divide"),
        ({"algo": "hier-avg", "group_size": 2, "workers": 2}, True, "a fixed size need"),
        ({"max_ranks": 4}, True, "replacements join local-sgd"),  # lasgd's job budget
        ({"algo": "local-sgd", "max_ranks": 4, "workers": 2}, True, "W = 1"),
        ({"algo": "local-sgd", "max_ranks": 4, "outer_momentum": 0.9}, True, "outer"),
    ],
)
def test_refused(flat: dict, ulfm: bool, message: str) -> None:
    c = cfg(**flat)
    with pytest.raises(ConfigError, match=message.replace("-", "\\-")):
        elastic.check(c, launch(ulfm=ulfm))


def test_more_than_the_world_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_ranks: 5 is more than the job's 4"):
        cfg(min_ranks=5).validate(4)


def test_the_world_size_or_zero_is_today_s_behaviour() -> None:
    for m in (0, 4):
        c = cfg(min_ranks=m, comm="gloo", algo="hier-avg")
        assert not elastic.wanted(c, 4)
        elastic.check(c, launch(ulfm=False))  # nothing to refuse
    for algo in ("lasgd", "local-sgd", "hier-avg", "sync", "none"):
        elastic.check(cfg(algo=algo), launch())  # over MPI with ULFM: accepted
    for algo in ("lasgd", "local-async", "local-sgd", "hier-avg"):  # and with W workers
        elastic.check(cfg(algo=algo, workers=2), launch())


def test_max_ranks_rules() -> None:
    with pytest.raises(ConfigError, match="max_ranks: replacements follow a loss"):
        cfg(min_ranks=0, max_ranks=4).validate(4)
    with pytest.raises(ConfigError, match="max_ranks: 5 is more than the job's 4"):
        cfg(max_ranks=5).validate(4)
    with pytest.raises(ConfigError, match="max_ranks: must be >= 0"):
        cfg(max_ranks=-1).validate(4)
    srun = Launch("srun", 0, 4, 0, 4, "node1", None, None, "7", None, ulfm=True)
    with pytest.raises(ConfigError, match="under srun they cannot be"):
        elastic.check(cfg(algo="local-sgd", max_ranks=4, comm="mpi"), srun)
    for algo in ("local-sgd", "hier-avg", "sync", "none"):  # accepted under mpirun
        elastic.check(cfg(algo=algo, max_ranks=4), launch())
