"""Hostile input to ``hpc-asgd report`` and ``hpc-asgd predict``: whatever the files in a run
folder hold and whatever the arguments are, each tool succeeds or prints one line on stderr
and exits 2, never a traceback, and leaves no output file half-written. The issue's cases
one by one, then property tests with ``hypothesis``: the readers on random ``summary.json``
and ``metrics.jsonl`` contents, a few whole reports (matplotlib is slow), random argument
lists of ``predict``. ``HPC_ASGD_EXAMPLES`` scales the number of examples (a long search)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hpc_asgd.cli import main
from hpc_asgd.tools.predict import PredictError, load_run
from hpc_asgd.tools.report import (
    ReportError,
    load_runs,
    markdown,
    rank_figures,
    scaling,
    write_report,
)
from hpc_asgd.tools.safe_io import MAX_BYTES, Outputs
from tests.conftest import ROOT

SCALE = int(os.environ.get("HPC_ASGD_EXAMPLES", "0")) or None


def examples(n: int) -> settings:
    return settings(
        max_examples=SCALE or n,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def call(*argv: str) -> tuple[int, str, str]:
    """``hpc-asgd ARGV`` in this process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse: --help (0) or a bad value (2)
            rc = e.code if isinstance(e.code, int) else 0
    return rc, out.getvalue(), err.getvalue()


def assert_one_line(rc: int, err: str, tool: str) -> None:
    assert rc == 2, (rc, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"hpc-asgd {tool}: error: ") and "Traceback" not in err, err


def assert_no_leftovers(folder: Path) -> None:
    """No temporary file of an output left behind."""
    if folder.is_dir():
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


SUMMARY = {
    "algo": "lasgd",
    "update": "leashed",
    "worker_processes": 2,
    "world_size": 2,
    "workers_per_rank": 2,
    "dataset": "digits",
    "model": "mlp",
    "epochs": 2,
    "steps_per_rank": 10,
    "steps_taken": [10, 12],
    "train_s": [1.0, 1.25],
    "comm_wait_s": [0.1, 0.2],
    "samples_per_s": 300.0,
    "final_test_acc": 0.9,
    "config": {
        "batch_size": 16,
        "slow_rank": -1,
        "slow_factor": 1.0,
        "delay": "",
        "pause_rank": -1,
        "pause_at": 0,
        "pause_s": 0.0,
        "period": 4,
        "local_period": 2,
        "global_period": 2,
        "group_size": 2,
        "hier_mode": "blocking",
    },
    "workers": {"staleness_hist": [5, 3, 1], "cas_tries_hist": [8, 1, 0]},
    # what predict reads too
    "model_floats": 1000,
    "model_params": 990,
    "step_time_hist": [0] * 18 + [10, 12],
    "step_time_s": [0.01, 0.011],
    "averaging_rounds": 5,
}
ROW = {"epoch": 1, "time_s": 0.5, "samples": 160, "train_loss": 0.7, "test_acc": 0.8}


def write_run(folder: Path, summary: dict | None = None, rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(SUMMARY if summary is None else summary))
    rows = [ROW, {**ROW, "time_s": 1.0, "samples": 320}] if rows is None else rows
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ---- the cases -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"time_s": 1, "samples": ' + "9" * 5001 + ', "test_acc": 0.5, "train_loss": 1}',
         "line 2 is not valid JSON (Exceeds the limit (4300 digits)"),
        ('{"time_s": 1, "samples": 3, "test_acc": "high", "train_loss": 1}',
         'line 2: test_acc is "high", not a number in [0, 1] or null'),
        ('{"time_s": 1, "test_acc": 0.5, "train_loss": 1}', "line 2: no field 'samples'"),
        ('{"time_s": NaN, "samples": 3, "test_acc": 0.5, "train_loss": 1}',
         "line 2: time_s is NaN, not a number in [0, 1e+15]"),
        ('{"time_s": 1, "samples": 3, "test_acc": true, "train_loss": 1}',
         "line 2: test_acc is true, not a number"),
        ('{"time_s": 1, "samples": 3, "test_acc": 0.5, "train_loss": 1e400}',
         "line 2: train_loss is Infinity"),
        ("[1, 2]", "line 2: a list, not a JSON object"),
        ("[" * 100_000, "line 2 is not valid JSON (nested too deeply)"),
    ],
)  # fmt: skip
def test_a_bad_metrics_row_is_one_line(tmp_path: Path, line: str, message: str) -> None:
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text(json.dumps(ROW) + "\n" + line + "\n")
    rc, out, err = call("report", str(run))
    assert_one_line(rc, err, "report")
    assert f"{run / 'metrics.jsonl'}: {message}" in err, err
    assert not (run / "report").exists() and not out


def test_bad_bytes_and_bad_summaries_are_one_line(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").write_bytes(json.dumps(ROW).encode() + b'\n{"a": "\xff"}\n')
    rc, _, err = call("report", str(run))
    assert_one_line(rc, err, "report")
    assert "metrics.jsonl: line 2 is not UTF-8 text (byte 0xff)" in err
    write_run(run)
    for bad, message in (
        ({**SUMMARY, "world_size": "2"}, 'world_size is "2", not an integer in [1, 65,536]'),
        ({**SUMMARY, "config": []}, "config is a list, not an object"),
        ({**SUMMARY, "dataset": ["a"]}, "dataset is a list, not a printable string"),
        ({**SUMMARY, "train_s": [1, "x"]}, 'train_s[1] is "x", not a number'),
        ({**SUMMARY, "workers": {"staleness_hist": [1.5]}}, "workers.staleness_hist[0] is 1.5"),
        ({**SUMMARY, "algo": "a\nb"}, 'algo is "a\\nb", not a printable string'),
    ):
        (run / "summary.json").write_text(json.dumps(bad))
        rc, _, err = call("report", str(run))
        assert_one_line(rc, err, "report")
        assert f"{run / 'summary.json'}: {message}" in err, err
        assert not (run / "report").exists()


def test_paths_that_are_not_utf8(tmp_path: Path) -> None:
    """A folder or --out named with a byte that is not UTF-8: printed escaped, and the
    report beside a run so named is written whole (it used to leave a 0-byte report.md)."""
    run = write_run(tmp_path / "run")
    base = os.fsencode(tmp_path)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}

    def cli(*args: bytes) -> subprocess.CompletedProcess:
        cmd = [os.fsencode(sys.executable), b"-m", b"hpc_asgd.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=120, env=env, check=False)

    out = base + b"/o\xff"
    res = cli(b"report", os.fsencode(run), b"--out", out)
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.decode() == f"hpc-asgd report: wrote {tmp_path}/o\\xff/report.md and its plots\n"
    )
    assert (Path(os.fsdecode(out)) / "report.md").stat().st_size > 100
    odd = Path(os.fsdecode(base + b"/r\xfe"))
    write_run(odd)
    res = cli(b"report", os.fsencode(odd))
    assert res.returncode == 0 and not res.stderr, res.stderr
    text = (odd / "report" / "report.md").read_text()  # UTF-8: the byte written as \xfe
    assert f"`{tmp_path}/r\\xfe`" in text
    (odd / "summary.json").write_text("{")
    res = cli(b"report", os.fsencode(odd), b"--out", base + b"/p\xfd")
    assert res.returncode == 2 and res.stderr.count(b"\n") == 1, res.stderr
    assert res.stderr.startswith(f"hpc-asgd report: error: {tmp_path}/r\\xfe/summary.json".encode())
    assert not Path(os.fsdecode(base + b"/p\xfd")).exists()
    res = cli(b"predict", b"--nodes", b"1", b"--algo", b"sync", b"--out", base + b"/q\xff/\xfe")
    assert res.returncode == 0, res.stderr
    assert (Path(os.fsdecode(base + b"/q\xff/\xfe")) / "predict.md").is_file()


def test_an_output_that_cannot_be_written(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    for out, message in (
        ("/proc/nope", "/proc/nope: cannot make the folder (No such file or directory)"),
        (str(tmp_path / "file"), f"{tmp_path / 'file'}: exists and is not a folder"),
        (str(tmp_path / "file" / "x"), f"{tmp_path / 'file' / 'x'}: cannot make the folder"),
        ("/proc/self", "/proc/self/curves.png: cannot write"),
    ):
        for argv in (("report", str(run), "--out", out), ("predict", "--nodes", "1", "--out", out)):
            rc, _, err = call(*argv)
            assert_one_line(rc, err, argv[0])
            if argv[0] == "report" or "curves" not in message:
                assert message in err, err


def test_a_failed_report_keeps_the_last_one_whole(tmp_path: Path, monkeypatch) -> None:
    """Every file goes to a temporary name and all move into place at the end: a failure
    past the checks (here while writing report.md) changes nothing and leaves nothing."""
    run = write_run(tmp_path / "run")
    rep = tmp_path / "rep"
    assert call("report", str(run), "--out", str(rep))[0] == 0
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    assert set(before) == {"report.md", "curves.png", "ranks.png", "workers.png"}

    def broken(*_a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hpc_asgd.tools.report.markdown", broken)
    rc, _, err = call("report", str(run), "--out", str(rep))
    assert_one_line(rc, err, "report")
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before
    # a folder it made is removed again
    rc, _, err = call("report", str(run), "--out", str(tmp_path / "new"))
    assert rc == 2 and not (tmp_path / "new").exists()


def test_outputs_on_a_failing_write(tmp_path: Path) -> None:
    def fail(f) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")

    message = r"/out/b: cannot write \(No space left on device\)"
    with pytest.raises(ReportError, match=message), Outputs(tmp_path / "out", ReportError) as out:
        out.write("a", lambda f: f.write(b"whole"))
        out.write("b", fail)
        out.commit()
    assert not (tmp_path / "out").exists()


def test_predict_refuses_bad_arguments_in_one_line(tmp_path: Path) -> None:
    for argv, message in (
        (["--algo", "hier-avg", "--group-size", "0"], "--group-size: 0 is not in [1, 1,048,576]"),
        (["--out", "/proc/nope"], "/proc/nope: cannot make the folder"),
        (["--batch-size", "-3"], "--batch-size: -3 is not in [0, 1,000,000,000]"),
        (["--params", "-1"], "--params: -1 is not in [0,"),
        (["--nodes", "0"], "--nodes: 0 is not in [1,"),
        (["--period", "100000"], "--period: 100000 is not in [1, 4,096]"),
        (["--step-cv", "inf"], "--step-cv: inf is not a finite number in [0, 10]"),
        (["--mem-gbs", "0"], "--mem-gbs: 0.0 is not a finite number"),
        (["--bandwidth-gbs", "1e-9"], "--bandwidth-gbs: 0 (the interconnect's) or at least"),
        (["--straggler-factor", "0.5"], "--straggler-factor: 0.5 is not a finite number in [1,"),
        (["--algo", "hier-avg", "--period", "3", "--local-period", "2", "--plot-period", "3"],
         "no --period K is a multiple of a --local-period"),
        (["--algo", "hier-avg", "--group-size", "3", "--nodes", "4"], "divides none of --nodes"),
        (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
        (["--nodes"], "argument --nodes: expected at least one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--calibrate", str(tmp_path / "absent")], "no readable summary.json: cannot read"),
    ):  # fmt: skip
        rc, out, err = call("predict", *argv)
        assert_one_line(rc, err, "predict")
        assert message in err, (argv, err)
        assert not out


def test_predict_reads_a_hostile_summary_in_one_line(tmp_path: Path) -> None:
    for bad, message in (
        ({**SUMMARY, "steps_taken": [0, 12]}, "steps_taken[0] is 0, not a number in [1,"),
        ({**SUMMARY, "config": {**SUMMARY["config"], "period": 10**9}}, "config.period is"),
        ({**SUMMARY, "config": {**SUMMARY["config"], "group_size": 0}}, None),  # groups' size
        ({**SUMMARY, "groups": [[]], "config": {**SUMMARY["config"], "group_size": 0}},
         "group_size is 0, not an integer in [1,"),
        ({**SUMMARY, "step_time_hist": ["1"]}, 'step_time_hist[0] is "1"'),
        ({**SUMMARY, "step_time_s": []}, "steps_taken and step_time_s must not be empty"),
        ({**SUMMARY, "samples_per_s": 0}, "samples_per_s is 0, not a number in [1e-09,"),
        ({**SUMMARY, "train_s": [0.1, 0.1], "comm_wait_s": [0.2, 0.3]}, "is not > 0"),
    ):  # fmt: skip
        write_run(tmp_path, bad)
        if message is None:
            load_run(tmp_path)  # group_size 0: the groups formed (none: the world)
            continue
        with pytest.raises(PredictError, match=r"summary\.json has a field") as e:
            load_run(tmp_path)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "summary.json").write_bytes(b'{"a": [' + b"9" * 5000 + b"]}")
    rc, _, err = call("predict", "--calibrate", str(tmp_path))
    assert_one_line(rc, err, "predict")
    assert "no readable summary.json: not valid JSON (Exceeds the limit (4300 digits)" in err


def test_a_file_too_large_or_not_regular(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse
    rc, _, err = call("report", str(run))
    assert_one_line(rc, err, "report")
    assert "metrics.jsonl: over 256 MiB" in err
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")  # not is_file(): no rows (a FIFO would block the read)
    (run / "summary.json").unlink()
    os.mkfifo(run / "summary.json")
    rc, _, err = call("report", str(tmp_path))  # a folder of runs: the FIFO is no run
    assert_one_line(rc, err, "report")
    assert "no summary.json in it" in err
    rc, _, err = call("report", str(tmp_path / ("x" * 5000)))
    assert_one_line(rc, err, "report")
    assert "File name too long" in err


# ---- property tests ----------------------------------------------------------------------

RAW = {"@@BIG@@": "9" * 5001, "@@NAN@@": "NaN", "@@INF@@": "-Infinity", "@@HUGE@@": "1e400"}
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()  # NaN and infinities too
    | st.text(max_size=12)
    | st.sampled_from([*RAW, "$x$", "a|b", "\x00", "\ud800", "\n"])
)
HOSTILE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
NAME = st.text(st.characters(categories=["L", "N", "P", "S"], include_characters=" "), max_size=15)
VALID = {  # values in range, extremes included (what a real run could write, and more)
    "algo": st.sampled_from(["sync", "lasgd", "local-sgd", "hier-avg", "none"]) | NAME,
    "update": st.sampled_from(["leashed", "hogwild", "lock"]) | NAME | st.none(),
    "world_size": st.integers(1, 40) | st.sampled_from([None, 65536]),
    "workers_per_rank": st.integers(1, 4) | st.sampled_from([None, 65536]),
    "worker_processes": st.integers(0, 4) | st.none(),
    "samples_per_s": st.floats(0, 1e15) | st.integers(0, 10**15) | st.none(),
    "epochs": st.floats(0, 1e15) | st.none(),
    "final_test_acc": st.floats(0, 1) | st.none(),
    "steps_taken": st.lists(st.integers(0, 10**15) | st.none(), max_size=5),
    "train_s": st.lists(st.floats(0, 1e15) | st.none(), max_size=5),
    "comm_wait_s": st.lists(st.floats(0, 1e15) | st.none(), max_size=5),
    "batch_size": st.integers(1, 10**15) | st.none(),
    "slow_rank": st.integers(-1, 3),
    "slow_factor": st.floats(0, 1e15),
    "delay": st.sampled_from(["", "exp:5", "$a$b"]),
    "staleness_hist": st.lists(st.integers(0, 10**15), max_size=8) | st.none(),
    "cas_tries_hist": st.lists(st.integers(0, 10**15), max_size=8) | st.none(),
    "time_s": st.floats(0, 1e15) | st.integers(0, 10**15),
    "samples": st.floats(0, 1e15) | st.integers(0, 10**15),
    "test_acc": st.floats(0, 1) | st.none(),
    "train_loss": st.floats(-1e15, 1e15) | st.none(),
}


MISSING = object()


@st.composite
def doc(draw, base: dict, broken: int, valid: dict | None = None) -> dict:
    """``base`` with each key kept or given another valid value (``valid``, default VALID),
    but for up to ``broken`` keys (in each object) given any JSON value or missing."""
    valid = VALID if valid is None else valid
    bad = set(draw(st.lists(st.sampled_from(sorted(base)), max_size=broken, unique=True)))
    out = {}
    for key, was in base.items():
        v = was
        if key in bad:
            v = draw(HOSTILE | st.just(MISSING))
        elif isinstance(was, dict):
            v = draw(doc(was, broken, valid))
        elif key in valid:
            v = draw(st.just(was) | valid[key])
        if v is not MISSING:
            out[key] = v
    return out


def dumps(value: object) -> bytes:
    text = json.dumps(value)
    for mark, raw in RAW.items():
        text = text.replace(f'"{mark}"', raw)
    return text.encode()


MANGLE = st.sampled_from([b"\xff", b"\xc3", b"9" * 5001, b"NaN", b"[" * 50_000, b"\n", b"\x00"])


@st.composite
def content(draw, base: dict, broken: int, valid: dict | None = None) -> bytes:
    """A file's bytes: a document from ``base``, maybe cut short or with bytes put in."""
    data = dumps(draw(doc(base, broken, valid)))
    how = draw(st.sampled_from(["as is"] * 12 + ["cut", "insert", "bytes"]))
    at = draw(st.integers(0, len(data)))
    if how == "cut":
        return data[:at]
    if how == "insert":
        return data[:at] + draw(MANGLE) + data[at:]
    return data if how == "as is" else draw(st.binary(max_size=40))


@st.composite
def rows(draw, broken: int) -> bytes:
    lines = draw(st.lists(content(ROW, broken), max_size=4))
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


def folder_of(root: Path, summary: bytes, metrics: bytes | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_bytes(summary)
    if metrics is not None:
        (root / "metrics.jsonl").write_bytes(metrics)
    return root


@examples(150)
@given(summary=content(SUMMARY, 2), metrics=st.none() | rows(1))
def test_readers_take_anything(summary: bytes, metrics: bytes | None) -> None:
    """The readers and everything the report computes from what they accept (all but the
    plots): a run, or one line of ReportError / PredictError."""
    with tempfile.TemporaryDirectory() as tmp:
        run = folder_of(Path(tmp) / "run", summary, metrics)
        try:
            runs = load_runs([run])
        except ReportError as e:
            assert "\n" not in str(e) and str(e).startswith(str(run)), str(e)
            event("refused")
        else:
            event("read")
            points = scaling(runs)
            for r in runs:
                rank_figures(r)
            markdown(runs, points, []).encode("utf-8", "backslashreplace")
        try:
            load_run(run)
        except PredictError as e:
            assert "\n" not in str(e), str(e)
        else:  # what predict makes of a run it accepts: a fit, or one line
            small = ("--nodes", "1", "4", "--period", "2", "--algo", "sync", "lasgd")
            rc, out, err = call("predict", "--calibrate", str(run), *small)
            event(f"predict exit {rc}")
            if rc:
                assert_one_line(rc, err, "predict")
            else:
                assert not err and out.startswith("# hpc-asgd predict"), err


@examples(8)
@given(runs=st.lists(st.tuples(content(SUMMARY, 1), st.none() | rows(0)), min_size=1, max_size=3))
def test_whole_reports_succeed_or_say_why(runs: list[tuple[bytes, bytes | None]]) -> None:
    """The whole report (the plots too) of runs that are mostly in range: report.md and its
    PNGs, or one line and no file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (summary, metrics) in enumerate(runs):
            folder_of(root / "runs" / f"r{i}", summary, metrics)
        try:
            path = write_report([root / "runs"], root / "rep")
        except ReportError as e:
            assert "\n" not in str(e), str(e)
            assert not (root / "rep").exists()
            event("refused")
        else:
            event("written")
            assert path.read_text().startswith("# hpc-asgd report")
            assert_no_leftovers(root / "rep")


PREDICT_VALID = {  # what a run of 2 ranks could write, extremes included (K kept small: slow)
    "algo": st.sampled_from(["none", "sync", "local-sgd", "lasgd", "local-async", "hier-avg"]),
    "samples_per_s": st.floats(1e-9, 1e15),
    "steps_taken": st.lists(st.floats(1, 1e15), min_size=2, max_size=2),
    "train_s": st.lists(st.floats(1, 1e15), min_size=2, max_size=2),
    "comm_wait_s": st.lists(st.floats(0, 1), min_size=2, max_size=2),
    "step_time_hist": st.lists(st.integers(0, 10**15), max_size=40),
    "step_time_s": st.lists(st.floats(1e-9, 1e15), min_size=1, max_size=3),
    "model_floats": st.integers(1, 10**13),
    "model_params": st.integers(1, 10**13),
    "averaging_rounds": st.floats(0, 1e15) | st.none(),
    "workers_per_rank": st.integers(1, 65536) | st.none(),
    "batch_size": st.integers(1, 10**9),
    "period": st.integers(1, 16),
    "local_period": st.integers(1, 4),
    "global_period": st.integers(1, 4),
    "group_size": st.integers(1, 4),
    "hier_mode": st.sampled_from(["blocking", "nonblocking"]),
}


@examples(40)
@given(
    summaries=st.lists(content(SUMMARY, 1, PREDICT_VALID), min_size=1, max_size=3),
    validate=st.booleans(),
)
def test_predict_calibrates_on_anything(summaries: list[bytes], validate: bool) -> None:
    """Runs of random figures (a field out of range at times): a fit and its table (and the
    validation), or one line."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [str(folder_of(Path(tmp) / f"r{i}", s, None)) for i, s in enumerate(summaries)]
        small = ["--nodes", "1", "4", "--period", "2", "--algo", "sync", "lasgd", "hier-avg"]
        rc, out, err = call("predict", "--calibrate", *dirs, *small, *["--validate"] * validate)
        event(f"exit {rc}")
        if rc:
            assert_one_line(rc, err, "predict")
        else:
            assert not err and out.startswith("# hpc-asgd predict"), err


FLAGS = {
    "--model": st.sampled_from(["resnet20", "resnet50", "custom", "vgg"]),
    "--params": st.sampled_from(["0", "1000", "-1", "1e3", str(10**14)]),
    "--step-ms": st.sampled_from(["0", "5", "-1", "nan", "inf", "1e300", "x"]),
    "--step-cv": st.sampled_from(["0", "0.3", "11", "-0.1"]),
    "--batch-size": st.sampled_from(["0", "8", "-3", "1.5", str(10**12)]),
    "--interconnect": st.sampled_from(["ndr400", "1gbe", "token-ring"]),
    "--latency-us": st.sampled_from(["0", "2", "-5", "1e308"]),
    "--bandwidth-gbs": st.sampled_from(["0", "1e-9", "1e-6", "10", "nan"]),
    "--allreduce": st.sampled_from(["auto", "ring", "tree", "butterfly"]),
    "--algo": st.sampled_from(["sync", "lasgd", "hier-avg", "hier-avg-nb", "none", "local-sgd"]),
    "--period": st.sampled_from(["1", "2", "3", "4", "0", "-2", "5000", "2.5"]),
    "--local-period": st.sampled_from(["1", "2", "3", "0", str(2**64)]),
    "--group-size": st.sampled_from(["1", "2", "3", "8", "0", "-1", str(10**7)]),
    "--nodes": st.sampled_from(["1", "2", "4", "6", "0", "-4", str(2**20), str(2**21)]),
    "--straggler-rate": st.sampled_from(["0", "0.1", "0.99", "1", "nan", "-0.1"]),
    "--straggler-factor": st.sampled_from(["1", "2", "0.5", "1e7", "inf"]),
    "--mem-gbs": st.sampled_from(["500", "0", "1e-7", "-1"]),
    "--plot-period": st.sampled_from(["0", "1", "2", "4", "7"]),
    "--compute-from": st.sampled_from(["none", "own", "theirs"]),
    "--validate": st.just(None),
    "--calibrate": st.sampled_from(["@absent", "@garbage", "@run"]),
    "--out": st.sampled_from(["@out", "/proc/nope", "@file", "@odd"]),
    "--bogus": st.just(None),
}
MULTI = {"--model", "--interconnect", "--algo", "--period", "--local-period", "--nodes"}


@st.composite
def predict_argv(draw) -> list[str]:
    argv = ["--nodes", "1", "4", "--period", "2", "4", "--algo", "sync", "lasgd"]  # small
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5)):
        argv.append(flag)
        count = draw(st.integers(0, 3)) if flag in MULTI else 1
        argv += [draw(FLAGS[flag]) for _ in range(count) if FLAGS[flag] is not None]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["stray", "-x", "--", "--nodes=2", "--step-ms=-0"])))
    return [a for a in argv if a is not None]


@examples(60)
@given(argv=predict_argv())
def test_predict_takes_any_arguments(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_run(root / "run", {**SUMMARY, "algo": "sync"})
        folder_of(root / "garbage", b'{"model_floats": 1, "step_time_hist": {}}', None)
        (root / "file").write_text("x")
        places = {"@absent": root / "absent", "@garbage": root / "garbage", "@run": root / "run",
                  "@out": root / "out", "@file": root / "file",
                  "@odd": Path(os.fsdecode(os.fsencode(tmp) + b"/\xff"))}  # fmt: skip
        argv = [str(places[a]) if a in places else a for a in argv]
        rc, out, err = call("predict", *argv)
        event(f"exit {rc}")
        if rc == 0:
            assert not err and out.startswith("# hpc-asgd predict"), (argv, err)
        else:
            assert_one_line(rc, err, "predict")
        assert_no_leftovers(root / "out")
