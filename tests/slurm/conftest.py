"""Fixtures of the SLURM tests: one local cluster per session, started by scripts/slurm_local.sh."""

from __future__ import annotations

import pytest

from tests.slurm.helpers import Cluster, start_cluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: submits jobs to a real local SLURM cluster")


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    """The running cluster; skips (saying why) only where none can be started."""
    return start_cluster()
