"""The workers' stats table: one row of float64 counters per worker, ``(W, NSTATS)``.

Written by each worker's step (its own row, in shared memory; numpy element updates cost
~100 ns), read by the rank's main process for evaluations, the divergence check and the
summary. Below the step and the rules: it imports nothing of the package but the errors.
"""

from __future__ import annotations

import math

import torch

from hpc_asgd.errors import HpcAsgdError

HIST_BINS = 16  # staleness 0..14 and >= 15; CAS tries 1..15 and >= 16

STEPS, APPLIED, DROPPED, LOCK_WAIT, LOSS_SUM = range(5)
STALE0 = 5  # staleness histogram: HIST_BINS columns
TRIES0 = STALE0 + HIST_BINS  # CAS-tries histogram: HIST_BINS columns (tries 1.. in bin 0..)
# Steps skipped for a non-finite loss or gradient; the first and last such node step (1-based,
# 0 = none): the divergence check's evidence.
NONFINITE = TRIES0 + HIST_BINS
NF_FIRST, NF_LAST = NONFINITE + 1, NONFINITE + 2
# CPU seconds of this worker's steps (the process's, its torch threads included; sleeps of
# the injected delays are not CPU): ``summary.json``'s ``worker_cpu_s``, this session's.
CPU_S = NONFINITE + 3
# Wall seconds of this worker's steps (its own work and injected delays; not sync's gradient
# allreduce), and their histogram: ``STEP_BINS`` log-spaced bins (:func:`step_bin`), the
# distribution ``hpc-asgd predict --calibrate`` takes the compute time's shape from.
STEP_T_SUM = CPU_S + 1
STEP_T0 = STEP_T_SUM + 1
STEP_BINS = 40
STEP_T_MIN = 20e-6  # s: bin 0 is below it; bin k >= 1 from STEP_T_MIN x 2^((k-1)/2), x sqrt(2)
# Rows padded to whole 64-byte cache lines: two workers writing their own rows every step
# must not share a line (false sharing: the line would bounce between their cores).
NSTATS = -(-(STEP_T0 + STEP_BINS) // 8) * 8


def bin_of(value: int) -> int:
    """The histogram bin of ``value``: clamped to ``0 .. HIST_BINS - 1``."""
    return min(max(value, 0), HIST_BINS - 1)


class DivergedError(HpcAsgdError):
    """More non-finite steps than ``--max-nonfinite`` on one rank."""


def step_bin(seconds: float) -> int:
    """The step-time histogram bin of ``seconds`` (half-octave bins, clamped)."""
    if seconds < STEP_T_MIN:
        return 0
    return min(STEP_BINS - 1, 1 + int(2 * math.log2(seconds / STEP_T_MIN)))


def step_bin_seconds(k: int) -> float:
    """A representative step time of bin ``k``: the geometric middle of its edges."""
    return STEP_T_MIN * 2 ** ((k - 1) / 2 + 0.25) if k else STEP_T_MIN / 2


def check_finite(stats: torch.Tensor, limit: int, lr: float) -> None:
    """Raise :class:`DivergedError` once this rank's workers (rows of ``stats``, (W, NSTATS))
    skipped more than ``limit`` steps for a non-finite loss or gradient."""
    count = int(stats[:, NONFINITE].sum())
    if count <= limit:
        return
    first = int(min(x for x in stats[:, NF_FIRST].tolist() if x > 0))
    last = int(stats[:, NF_LAST].max())
    raise DivergedError(
        f"training diverged: non-finite loss or gradient in {count} node steps (first at node "
        f"step {first}, last at {last}; each was skipped, --max-nonfinite {limit}); "
        f"lower --lr ({lr:g}) or add --warmup-epochs"
    )


def step_times(st: torch.Tensor) -> dict:
    """``summary.json``'s step times from every rank's table ``(ranks, W, NSTATS)``: the mean
    per rank (seconds, a worker's own step: its work and injected delays) and the histogram
    summed over ranks and workers."""
    steps = st[:, :, STEPS].sum(1).clamp(min=1)
    hist = st[:, :, STEP_T0 : STEP_T0 + STEP_BINS].sum((0, 1))
    return {
        "step_time_s": [round(float(x), 7) for x in st[:, :, STEP_T_SUM].sum(1) / steps],
        "step_time_hist": [int(v) for v in hist.tolist()],
        "step_time_bins": f"bin 0: < {STEP_T_MIN * 1e6:g} us; bin k: {STEP_T_MIN * 1e6:g} us "
        f"x 2^((k-1)/2) to x 2^(k/2); bin {STEP_BINS - 1}: the rest",
    }


def worker_metrics(update: str, st: torch.Tensor) -> dict:
    """Per-worker steps and the update rule's histograms, summed over ranks and workers;
    ``st`` is every rank's table, ``(ranks, W, NSTATS)``."""

    def ints(t: torch.Tensor) -> list[int]:
        return [int(v) for v in t.tolist()]

    out = {
        "steps": [ints(r) for r in st[:, :, STEPS]],  # [rank][worker]
        "applied": int(st[:, :, APPLIED].sum()),
        "dropped": int(st[:, :, DROPPED].sum()),
        "staleness_hist": ints(st[:, :, STALE0 : STALE0 + HIST_BINS].sum((0, 1))),
        "staleness_hist_bins": f"0..{HIST_BINS - 2}, >={HIST_BINS - 1} updates in between",
    }
    if update == "leashed":
        out["cas_tries_hist"] = ints(st[:, :, TRIES0 : TRIES0 + HIST_BINS].sum((0, 1)))
        out["cas_tries_hist_bins"] = f"1..{HIST_BINS - 1}, >={HIST_BINS} tries"
    if update == "locked":
        out["lock_wait_s"] = [[round(v, 4) for v in r.tolist()] for r in st[:, :, LOCK_WAIT]]
    return out
