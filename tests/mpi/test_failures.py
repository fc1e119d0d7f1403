"""Bad input and failing ranks: one readable line, a non-zero exit, no hang, no orphan."""

from __future__ import annotations

import pytest

from tests.conftest import HOST, assert_no_orphans, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]


BAD = [
    (["--algo", "bogus"], "algo: unknown value 'bogus'"),
    (["--model", "nope"], "model: unknown value 'nope'"),
    (["--dataset", "imagenet2"], "dataset: unknown value 'imagenet2'"),
    (["--algo", "hier-avg", "--group-size", "3"], "group_size: 3 does not divide the world size 2"),
    (["--algo", "local-sgd", "--period", "0"], "period: must be a positive integer"),
    (["--batch-size", "-4"], "batch_size: must be a positive integer"),
    (["--dataset", "mnist"], "data_dir: dataset 'mnist' needs --data-dir"),
    (["--batch-size", "5000"], "batch_size: 5000 exceeds the 718 samples per shard"),
]


@pytest.mark.parametrize(
    ("flags", "message"), BAD, ids=[b[1].split(":")[0] + "-" + b[0][-1] for b in BAD]
)
def test_bad_config(flags: list[str], message: str) -> None:
    res = train(2, *flags, "--epochs", "1", timeout=60)
    assert res.rc != 0
    assert res.seconds < 30, res.seconds
    lines = res.error_lines()
    assert len(lines) == 1 and lines[0].startswith(f"hpc-asgd: error: {message}"), res.text
    assert "Traceback" not in res.text
    assert_no_orphans(res.sid)


@pytest.mark.parametrize(
    "flags",
    [["--algo", "hier-avg", "--group-size", "3"], ["--lr", "-1"], ["--batch-size", "1000"]],
    ids=["group-size", "lr", "batch-size"],
)
def test_a_config_error_at_4_ranks_is_one_line_and_exit_2(flags: list[str]) -> None:
    """Rank 0 says it; the others wait quietly until the launcher ends them (no traceback)."""
    res = train(4, *flags, "--dataset", "digits", "--epochs", "1", timeout=90)
    assert res.rc == 2, res.text
    lines = res.error_lines()
    assert len(lines) == 1 and lines[0].startswith("hpc-asgd: error: "), res.text
    assert "Traceback" not in res.text and "StoppedError" not in res.text, res.text
    assert_no_orphans(res.sid)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nonexistent]\nlr = 0.5\n", r"unknown table [nonexistent]"),
        ("lr = 0.01\n[optim]\nlr = 5.0\n", "lr given twice (lr, [optim] lr)"),
        ("epochs = true\n", "epochs = True is not of type float"),
        ("lr = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
    ids=["unknown-table", "twice", "bool", "deep"],
)
def test_a_misread_config_file_is_one_line_and_exit_2(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    res = train(2, "--config", str(path), "--epochs", "1", timeout=60)
    assert res.rc == 2, res.text
    lines = res.error_lines()
    assert len(lines) == 1 and message in lines[0], res.text
    assert "Traceback" not in res.text
    assert_no_orphans(res.sid)


def test_missing_data_file(tmp_path) -> None:
    res = train(2, "--dataset", "mnist", "--data-dir", str(tmp_path), timeout=60)
    assert res.rc != 0 and res.seconds < 30
    lines = res.error_lines()
    assert lines and all("train-images-idx3-ubyte" in ln and str(tmp_path) in ln for ln in lines), (
        res.text
    )
    assert "Traceback" not in res.text
    assert_no_orphans(res.sid)


def test_corrupt_data_file(tmp_path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ):
        (d / name).write_bytes(b"\x80\x02not a real pickle")
    res = train(2, "--dataset", "cifar10", "--data-dir", str(tmp_path), timeout=60)
    assert res.rc != 0 and res.seconds < 30
    lines = res.error_lines()
    assert lines and all("checksum mismatch" in ln and str(d) in ln for ln in lines), res.text
    res = train(2, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-verify", timeout=60)
    assert res.rc != 0 and res.seconds < 30
    # without checksums the restricted unpickler still refuses the bytes, naming the file
    assert res.error_lines() and str(d) in res.error_lines()[0], res.text
    assert "Traceback" not in res.text
    assert_no_orphans(res.sid)


@pytest.mark.parametrize("engine", ["mpi", "gloo"])
def test_rank_that_raises_aborts_the_job(engine: str) -> None:
    res = train(
        2,
        "--algo",
        "sync",
        "--epochs",
        "5",
        "--comm",
        engine,
        "--comm-timeout",
        "10",
        env={"HPC_ASGD_FAULT": "raise@1:10"},
        timeout=60,
    )
    assert res.rc != 0
    line = f"hpc-asgd: error on rank 1/2 ({HOST}): RuntimeError: injected fault at step 10"
    assert line in res.text, res.text
    assert res.seconds < 40
    assert_no_orphans(res.sid)


@pytest.mark.parametrize("engine", ["mpi", "gloo"])
def test_rank_that_stops_answering_is_named(engine: str) -> None:
    res = train(
        2,
        "--algo",
        "sync",
        "--epochs",
        "5",
        "--comm",
        engine,
        "--comm-timeout",
        "4",
        env={"HPC_ASGD_FAULT": "stop@1:10"},
        timeout=60,
    )
    assert res.rc != 0
    assert f"timed out after 4 s on rank 0: rank(s) 1 ({HOST}) did not arrive" in res.text, res.text
    assert res.seconds < 40, res.seconds
    assert_no_orphans(res.sid)


ALGOS_KEEP = {  # (algorithm, budget): the job's, and --keep-training's in rank mode
    "lasgd-job": ["--algo", "lasgd", "--period", "4"],
    "hier-avg-nb-rank": [
        *("--algo", "hier-avg", "--group-size", "1", "--hier-mode", "nonblocking"),
        *("--budget", "rank", "--keep-training"),
    ],
}


@pytest.mark.parametrize("algo", list(ALGOS_KEEP))
def test_training_rank_names_a_peer_that_stops_answering(algo: str) -> None:
    """A rank that trains on (the job's budget is not spent; or --keep-training) does so
    while it waits, but not past the deadline of the rounds it owes (in process: the stopped
    process is the rank itself)."""
    res = train(
        2,
        *ALGOS_KEEP[algo],
        *("--epochs", "3"),
        *("--comm-timeout", "4"),
        env={"HPC_ASGD_FAULT": "stop@1:20"},
        timeout=60,
    )
    assert res.rc != 0
    # the round's own deadline passed while rank 0 trained on; it names the silent rank
    assert f"timed out after 4 s on rank 0: rank(s) 1 ({HOST}) did not arrive" in res.text, res.text
    assert res.seconds < 40, res.seconds
    assert_no_orphans(res.sid)
