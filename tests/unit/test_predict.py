"""``hpc-asgd predict``: the model's formulas against closed forms, the calibration recovering
known figures, real runs' step-time histograms, and its errors on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_asgd.stats import STEP_BINS, step_bin, step_bin_seconds
from hpc_asgd.tools.predict import (
    Algo,
    Compute,
    Machine,
    PredictError,
    allreduce_s,
    calibrate,
    expected_max,
    load_run,
    predict,
)
from hpc_asgd.tools.predict_cli import validate
from tests.conftest import ROOT


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpc_asgd.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200, check=False)


def test_allreduce_costs_are_the_textbook_ones() -> None:
    a, b, n = 1e-5, 1e9, 4e6
    assert allreduce_s(n, 1, a, b) == 0
    assert allreduce_s(n, 4, a, b, "ring") == pytest.approx(6 * a + 1.5 * n / b)
    assert allreduce_s(n, 4, a, b, "tree") == pytest.approx(4 * a + 4 * n / b)
    assert allreduce_s(n, 8, a, b, "rabenseifner") == pytest.approx(6 * a + 1.75 * n / b)
    # auto: the cheapest; tiny messages on many ranks: not the ring (latency 2(P-1))
    assert allreduce_s(8, 4096, a, b) == pytest.approx(24 * a + 1.99951 * 8 / b, rel=1e-4)


def test_expected_max_of_a_two_point_distribution() -> None:
    draws = np.sort(np.array([1.0, 2.0] * 500))
    for n in (1, 2, 5):
        assert expected_max(draws, n) == pytest.approx(2 - 0.5**n)


def test_sync_and_local_sgd_without_noise() -> None:
    m = Machine(1e-5, 1e9, Compute.lognormal(0.1, 0.0), 0.0, "ring")
    floats = params = 1_000_000
    ar = 2 * 3 * 1e-5 + 2 * 3 / 4 * 4e6 / 1e9
    p = predict(Algo("sync"), 4, m, floats, params, 32)
    assert p.step_s == pytest.approx(0.1 + ar)
    assert p.efficiency == pytest.approx(0.1 / (0.1 + ar))
    assert p.samples_per_s == pytest.approx(4 * 32 / (0.1 + ar))
    k8 = predict(Algo("local-sgd", period=8), 4, m, floats, params, 32)
    assert k8.step_s == pytest.approx(0.1 + ar / 8)
    # hier-avg S = 1 is K-AVG with K = K1 * K2
    h = predict(Algo("hier-avg", 8, 2, 4, 1), 4, m, floats, params, 32)
    assert h.step_s == pytest.approx(k8.step_s)


def test_stragglers_slow_sync_as_the_max_says() -> None:
    """Each step is 2x slow with probability 0.1: sync waits for the slowest of N, so its
    step is 1 + (1 - 0.9^N) times the base; efficiency is against the mean (1.1)."""
    c = Compute.lognormal(1.0, 0.0, straggler_rate=0.1, straggler_factor=2.0)
    m = Machine(0.0, math.inf, c, 0.0)
    for n in (2, 16, 256):
        p = predict(Algo("sync"), n, m, 10, 10, 1)
        assert p.step_s == pytest.approx(2 - 0.9**n, rel=0.01)
        assert p.efficiency == pytest.approx(1.1 / (2 - 0.9**n), rel=0.01)
    # local SGD averages the stragglers out over K steps: more efficient the larger K
    effs = [predict(Algo("local-sgd", period=k), 256, m, 10, 10, 1).efficiency for k in (1, 8, 64)]
    assert effs[0] < effs[1] < effs[2] < 1
    # a non-blocking algorithm does not wait for them
    assert predict(Algo("lasgd", period=8), 256, m, 10, 10, 1).efficiency == pytest.approx(1)


def test_step_bins_cover_their_values() -> None:
    for t in (1e-5, 3e-5, 1e-3, 0.37, 5.0):
        k = step_bin(t)
        assert 0 <= k < STEP_BINS
        if 0 < k < STEP_BINS - 1:
            assert step_bin_seconds(k) / 1.2 < t < step_bin_seconds(k) * 1.2


def _summary(algo: str, n: int, a: Algo, m: Machine, hist: list[int], steps: int = 400) -> dict:
    """The summary.json a run of the model's machine ``m`` would write."""
    floats, params, batch = 50_000, 49_000, 16
    p = predict(a, n, m, floats, params, batch)
    rounds = 0 if algo in ("none", "sync") else steps / (p.effective_period or a.period)
    return {
        "algo": "hier-avg" if algo.startswith("hier") else algo,
        "world_size": n,
        "steps_taken": [steps] * n,
        "train_s": [steps * p.step_s + p.tail_s] * n,
        "comm_wait_s": [0.0] * n,
        "samples_per_s": n * batch * steps / (steps * p.step_s + p.tail_s),
        "averaging_rounds": rounds,
        "model_floats": floats,
        "model_params": params,
        "step_time_hist": hist,
        "step_time_s": [m.compute.mean_s] * n,
        "config": {
            "batch_size": batch,
            "period": a.period,
            "local_period": a.local_period,
            "global_period": a.global_period,
            "group_size": a.group_size,
            "hier_mode": "nonblocking" if algo == "hier-avg-nb" else "blocking",
        },
    }


def test_calibration_recovers_a_known_machine(tmp_path: Path) -> None:
    """Runs written by the model itself (latency 50 us, 20 MB/s, 0.4 ms a round, compute
    slower at 4 nodes than at 2, as on a shared host): the fit finds the same figures and
    predicts each run from the others to within a fraction of a percent."""
    hist = [0] * STEP_BINS
    hist[18], hist[19], hist[21] = 50, 30, 20
    true = {
        n: Machine(5e-5, 2e7, Compute.from_hist(c, hist), 4e-4, "rabenseifner")
        for n, c in ((2, 0.01), (4, 0.018))
    }
    cases = [
        ("none", Algo("none")),
        ("sync", Algo("sync")),
        ("local-sgd", Algo("local-sgd", 8)),
        ("lasgd", Algo("lasgd", 8)),
        ("hier-avg", Algo("hier-avg", 8, 2, 4, 2)),
    ]
    dirs = []
    for n in (2, 4):
        for name, a in cases:
            d = tmp_path / f"{name}-{n}"
            d.mkdir()
            (d / "summary.json").write_text(json.dumps(_summary(name, n, a, true[n], hist)))
            dirs.append(d)
    runs = [load_run(d) for d in dirs]
    fit = calibrate(runs)
    assert fit[4].latency_s == pytest.approx(5e-5, rel=0.02)
    assert fit[4].bandwidth == pytest.approx(2e7, rel=0.02)
    assert fit[4].round_overhead_s == pytest.approx(4e-4, rel=0.02)
    assert fit[2].compute.mean_s == pytest.approx(0.01)
    for own in (False, True):  # compute from the --algo none runs, or each run's own steps
        v = validate(runs, "auto", own)
        assert len(v["rows"]) == 8 and v["max_abs_error"] < 0.01, v["rows"]


@pytest.mark.timeout(240)
def test_real_runs_calibrate_and_predict(tmp_path: Path) -> None:
    """A real run's step-time histogram counts every step of every worker; predict reads
    it, writes its table, JSON and plot."""
    common = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "16"]
    one, two = tmp_path / "w1", tmp_path / "w2"
    for out, extra in ((one, []), (two, ["--workers", "2"])):
        res = cli("train", *common, *extra, "--out", str(out))
        assert res.returncode == 0, res.stderr
        s = json.loads((out / "summary.json").read_text())
        steps = sum(sum(w) for w in s["workers"]["steps"])
        assert sum(s["step_time_hist"]) == steps == sum(s["steps_taken"])
        # the histogram's mean agrees with the measured mean step time (half-octave bins)
        hist = np.array(s["step_time_hist"])
        binned = hist @ np.array([step_bin_seconds(k) for k in range(hist.size)]) / hist.sum()
        assert 0.75 < binned / s["step_time_s"][0] < 1.33, (binned, s["step_time_s"])
        assert s["model_floats"] >= s["model_params"] > 0
    res = cli(
        "predict",
        "--calibrate",
        str(one),
        str(two),
        "--nodes",
        "1",
        "2",
        "4",
        "--period",
        "4",
        "--algo",
        "sync",
        "lasgd",
        "--out",
        str(tmp_path / "p"),
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "p" / "predict.json").read_text())
    preds = doc["scenarios"][0]["predictions"]
    assert {(p["algo"], p["nodes"]) for p in preds} == {
        (a, n) for a in ("sync", "lasgd") for n in (1, 2, 4)
    }
    assert (tmp_path / "p" / "predict.png").read_bytes().startswith(b"\x89PNG")
    assert "calibrated machine" in (tmp_path / "p" / "predict.md").read_text()
    # nothing to validate against: only runs without averaging
    res = cli("predict", "--calibrate", str(one), "--validate")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "hpc-asgd predict: error: --validate: no run but --algo none ones to predict"
    )


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    res = cli("predict", "--calibrate", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().startswith(f"hpc-asgd predict: error: {tmp_path}: no readable")
    (tmp_path / "summary.json").write_text(json.dumps({"algo": "sync", "world_size": 2}))
    res = cli("predict", "--calibrate", str(tmp_path))
    assert res.returncode == 2 and "has no model_floats / step_time_hist" in res.stderr
    summary = {"algo": "sync", "world_size": 2, "model_floats": 1, "step_time_hist": []}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    res = cli("predict", "--calibrate", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().endswith("summary.json has no field 'config'"), res.stderr
    res = cli("predict", "--straggler-rate", "1.5")
    assert res.returncode == 2 and "--straggler-rate in [0, 1)" in res.stderr
    res = cli("predict", "--step-ms", "nan")
    assert res.returncode == 2 and "--step-ms: nan is not a finite number" in res.stderr
    res = cli("predict", "--period", "4", "8", "--plot-period", "2")
    assert res.returncode == 2 and "--plot-period 2 is not one of --period" in res.stderr
    res = cli("predict", "--model", "vgg")
    assert res.returncode == 2 and "unknown ['vgg']" in res.stderr
    with pytest.raises(PredictError, match="does not divide"):
        predict(Algo("hier-avg", 8, 2, 4, 3), 8, Machine(0, 1, Compute.lognormal(1, 0), 0), 1, 1, 1)
