"""Every engine passes the same collective checks at 1, 2 and 4 real ranks under mpirun."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import mpirun

CHECK = "tests/mpi/collectives_check.py"
CASES = [("local", 1), ("mpi", 1), ("mpi", 2), ("mpi", 4), ("gloo", 1), ("gloo", 2), ("gloo", 4)]


@pytest.mark.mpi
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("engine", "n"), CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_collectives(engine: str, n: int) -> None:
    res = mpirun(n, [sys.executable, CHECK, engine], timeout=120)
    assert res.rc == 0, res.text
    assert res.out.count(f"OK {engine}") == n, res.text


@pytest.mark.mpi
@pytest.mark.timeout(100)
@pytest.mark.parametrize("engine", ["mpi", "gloo"])
def test_deadline_names_missing_rank(engine: str) -> None:
    res = mpirun(3, [sys.executable, CHECK, engine, "timeout"], timeout=80)
    assert res.rc == 0, res.text
    assert res.out.count("NAMED rank") == 2, res.text
