"""hpc_asgd as a library, with real ranks under mpirun: the example (a model of its own, AdamW,
the user's loop) with every synchroniser; the API's LocalSGD against the CLI's, bitwise; your
own model, dataset and loss in the CLI with workers; and the bad input of both, one line each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mpirun, summary, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

EXAMPLE = ROOT / "examples" / "own_loop.py"
ALGOS = ["sync", "local-sgd", "local-async", "lasgd", "hier-avg", "none"]


def example(n: int, out: Path, *flags: str, timeout: float = 120):
    return mpirun(n, [sys.executable, str(EXAMPLE), "--out", str(out), *flags], timeout)


@pytest.mark.parametrize("algo", ALGOS)
def test_the_example_with_every_synchroniser(tmp_path: Path, algo: str) -> None:
    out = tmp_path / "result.json"
    res = example(2, out, "--algo", algo)
    assert res.rc == 0, res.text
    r = json.loads(out.read_text())
    # 300 steps per rank: 0.98-0.997 over seeds 0-4 at 2 ranks, for every algorithm
    assert r["world_size"] == 2 and r["test_acc"] >= 0.9, r
    a, b = (set(s) for s in r["shards"])
    assert len(a) == len(b) == 4096 and not a & b  # the training set halved, disjoint
    stats = r["stats"]
    if algo == "none":  # no averaging: the ranks' models differ
        assert len(set(r["checksums"])) == 2 and stats["rounds"] == 0
        return
    assert len(set(r["checksums"])) == 1, r["checksums"]  # bitwise consensus
    assert stats["rounds"] >= {"sync": 300, "hier-avg": 15}.get(algo, 30), stats
    if algo in ("lasgd", "local-async"):  # the rounds overlapped the loop's steps
        assert stats["comm_overlap"] is not None and stats["comm_inflight_s"] > 0, stats
    if algo in ("sync", "local-sgd", "hier-avg"):  # blocking: every rank its 300 steps
        assert r["steps"] == [300, 300], r


@pytest.mark.parametrize(("model", "epochs"), [("mlp", "2"), ("resnet20", "1")])
def test_api_local_sgd_equals_the_cli_bitwise(tmp_path: Path, model: str, epochs: str) -> None:
    """torch.optim.SGD (momentum 0.9) hooked to hpc_asgd.LocalSGD in a plain loop, against
    ``hpc-asgd train --algo local-sgd`` (its flat SGD): the same elementwise arithmetic, the
    same rounds, so the same bits (resnet20: BatchNorm statistics averaged too)."""
    flags = ["--dataset", "digits", "--model", model, "--lr", "0.05", "--momentum", "0.9"]
    cli = train(2, *flags, "--epochs", epochs, "--algo", "local-sgd", "--period", "4",
                "--comm", "mpi", "--out", str(tmp_path / "cli"))  # fmt: skip
    assert cli.rc == 0, cli.text
    out = tmp_path / "api.json"
    api = mpirun(2, [sys.executable, str(ROOT / "tests/mpi/api_check.py"), str(out), epochs,
                     "4", "0.9", model])  # fmt: skip
    assert api.rc == 0, api.text
    s, a = summary(tmp_path / "cli"), json.loads(out.read_text())
    assert a["stats"]["rounds"] == s["averaging_rounds"] > 0
    assert a["checksums"] == s["param_checksums"] and len(set(a["checksums"])) == 1


def test_the_cli_with_your_own_model_dataset_and_loss(tmp_path: Path, nets) -> None:
    """W = 2 workers per rank import the factory themselves; local-async averages while they
    train with AdamW (its state private per worker and rank)."""
    out = tmp_path / "out"
    res = train(
        2, "--model", "mynets:build", "--dataset", "mynets:load", "--loss", "mynets:smooth",
        "--algo", "local-async", "--period", "4", "--workers", "2", "--optimizer", "adamw",
        "--lr", "0.003", "--epochs", "6", "--out", str(out), env=nets, timeout=180,
    )  # fmt: skip
    assert res.rc == 0, res.text
    s = summary(out)
    assert (s["model"], s["dataset"], s["worker_processes"]) == ("mynets:build", "mynets:load", 2)
    assert s["config"]["optimizer"] == "adamw" and s["config"]["loss"] == "mynets:smooth"
    assert s["consensus"] and s["averaging_rounds"] > 0, s
    assert s["final_test_acc"] >= 0.9, s["final_test_acc"]


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--model", "nosuch.mod:build"], "model: cannot import 'nosuch.mod' for nosuch.mod:build"),
        (["--model", "mynets:narrow"], "has shape (2, 5), but mynets:load has 8 classes"),
    ],
)  # fmt: skip
def test_bad_factories_are_one_line_before_any_collective(nets, flags, line) -> None:
    """Every rank checks (tests/unit/test_models.py has the other messages, in process); rank 0
    says it once, and no collective was started."""
    base = {"--model": "mynets:build", "--dataset": "mynets:load"}
    base.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    res = train(2, *(x for kv in base.items() for x in kv), env=nets, timeout=60)
    assert res.rc == 2, res.text
    assert len(res.error_lines()) == 1 and line in res.error_lines()[0], res.text
    assert "Traceback" not in res.text, res.text


SCRIPTS = {
    "init_twice": "comm = hpc_asgd.init()\nhpc_asgd.init()\n",
    "foreign_optimizer": (
        "comm = hpc_asgd.init()\nm, other = nn.Linear(3, 2), nn.Linear(3, 2)\n"
        "hpc_asgd.LocalSGD(m, torch.optim.SGD(other.parameters(), lr=0.1), comm, period=4)\n"
    ),
    "models_differ": (
        "comm = hpc_asgd.init()\nm = nn.Linear(3, 2 + comm.rank)\n"
        "with hpc_asgd.LASGD(m, torch.optim.SGD(m.parameters(), lr=0.1), comm, period=4):\n"
        "    pass\n"
    ),
}
LINES = {
    "init_twice": "hpc-asgd: error: hpc_asgd.init(): called twice in this process",
    "foreign_optimizer": "hpc-asgd: error: optimizer: 2 of its 2 parameters are not the model's",
    "models_differ": "hpc-asgd: error: model: rank 1 (2 tensors, 12 floats) differ from rank "
    "0's model (2 tensors, 8 floats",
}


@pytest.mark.parametrize("case", SCRIPTS)
def test_bad_api_use_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    script = tmp_path / f"{case}.py"
    script.write_text("import torch\nfrom torch import nn\nimport hpc_asgd\n" + SCRIPTS[case])
    res = mpirun(2, [sys.executable, str(script)], timeout=60)
    assert res.rc == 2, res.text
    assert len(res.error_lines()) == 1 and res.error_lines()[0].startswith(LINES[case]), res.text
    assert "Traceback" not in res.text, res.text


def _mine(*more: str) -> list[str]:
    return [
        *("--model", "mynets:build", "--dataset", "mynets:load", "--optimizer", "adamw"),
        *("--lr", "0.003", "--epochs", "2", "--algo", "local-sgd", "--period", "3", *more),
    ]


def test_your_own_model_with_adamw_resumes_bitwise(tmp_path: Path, nets) -> None:
    """W = 1: stop at a checkpoint, resume, and end with the bits of a straight run (AdamW's
    moments and step count are in the checkpoint)."""
    straight = train(2, *_mine("--out", str(tmp_path / "straight")), env=nets)
    assert straight.rc == 0, straight.text
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    first = train(2, *_mine(*ck, "--stop-at-step", "70"), env=nets)
    assert first.rc == 85 and "checkpointed at node step 70" in first.text, first.text
    resumed = train(2, *_mine(*ck, "--resume", "auto", "--out", str(tmp_path / "resumed")),
                    env=nets)  # fmt: skip
    assert resumed.rc == 0, resumed.text
    a, b = summary(tmp_path / "straight"), summary(tmp_path / "resumed")
    assert a["param_checksums"] == b["param_checksums"] and a["consensus"], (a, b)
    assert a["final_test_acc"] >= 0.9, a["final_test_acc"]


def test_partial_steps_with_adamw_in_the_workers(tmp_path: Path, nets) -> None:
    """LPP-SGD's partitioned rule with AdamW as the workers' direction: each worker's block
    keeps its own bias-correction count, and the model learns."""
    out = tmp_path / "out"
    flags = ["--update", "partitioned", "--workers", "2", "--epochs", "4"]
    res = train(2, *_mine(*flags, "--partition-after-epochs", "1", "--out", str(out)), env=nets)
    assert res.rc == 0, res.text
    s = summary(out)
    assert s["worker_processes"] == 2 and s["consensus"] and s["final_test_acc"] >= 0.9, s
