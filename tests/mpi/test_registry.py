"""A new algorithm is one new file: this file defines a synchroniser, registers it, and runs it
end to end at 2 ranks through the CLI (``python tests/mpi/test_registry.py train ...`` under
mpirun), touching no other file: its name becomes a valid ``--algo``, its own validation runs
before any collective, and its metrics reach summary.json."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hpc_asgd.errors import ConfigError
from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync import Periodic

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]


@SYNCHRONIZERS.register("every-kth")
class EveryKth(Periodic):
    """A blocking model average every K node steps (K-AVG without post-local SGD)."""

    @classmethod
    def validate(cls, cfg, world_size: int, local_size: int) -> None:
        if cfg.sync.period < 2:
            raise ConfigError(f"period: every-kth needs K >= 2, got {cfg.sync.period}")

    def next_stop(self, step: int) -> int:
        return step + self.period

    def step_done(self, step: int) -> None:
        self.average_model_()
        self.rounds += 1

    def metrics(self) -> dict:
        return {"every_kth_period": self.period}


def _train(*flags: str):
    from tests.conftest import mpirun

    return mpirun(2, [sys.executable, __file__, "train", *flags], timeout=90)


def test_a_registered_synchroniser_runs_end_to_end(tmp_path: Path) -> None:
    from tests.conftest import summary

    res = _train("--algo", "every-kth", "--period", "4", "--epochs", "2", "--out", str(tmp_path))
    assert res.rc == 0, res.text
    s = summary(tmp_path)
    # 22 node steps per epoch of the digits shard: 44 steps, a round every 4th
    assert s["algo"] == "every-kth" and s["averaging_rounds"] == 44 // 4, s
    assert s["every_kth_period"] == 4 and s["consensus"] and s["final_test_acc"] > 0.5, s


def test_its_own_validation_runs_before_any_collective() -> None:
    res = _train("--algo", "every-kth", "--period", "1")
    assert res.rc == 2, res.text
    assert res.error_lines() == ["hpc-asgd: error: period: every-kth needs K >= 2, got 1"]
    res = _train("--algo", "every-kth", "--period", "4", "--keep-training")  # not declared
    assert res.rc == 2 and "keep_training: only the non-blocking" in res.text, res.text


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.conftest`, the package
    from hpc_asgd.cli import main

    sys.exit(main(sys.argv[1:]))
