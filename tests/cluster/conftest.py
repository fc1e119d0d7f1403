"""Fixtures of the multi-node tests: the emulated cluster of ``scripts/slurm_local.sh start
--nodes 4``, started once per session (root only; elsewhere these tests skip, saying why)."""

from __future__ import annotations

import pytest

from tests.slurm.helpers import Cluster, start_cluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: ranks on several emulated nodes")


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    c = start_cluster()
    if not c.pmix:
        pytest.fail(f"srun --mpi=pmix across two nodes does not start MPI ranks: {c.pmix_why}")
    return c
