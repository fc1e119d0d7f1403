"""``hpc-asgd predict``: an analytic model of samples/s and parallel efficiency, 1 to 4,096 nodes.

What it assumes (docs/outputs-and-reports.md, "Predicting scale", states the same):

* One rank per node; a node step takes a compute time ``c`` drawn independently per step and
  node from a distribution: a lognormal of mean ``--step-ms`` and coefficient of variation
  ``--step-cv``, or the shape measured in runs (``summary.json`` ``step_time_hist``); a
  straggler step (probability ``--straggler-rate``) takes ``--straggler-factor`` times as long.
* An allreduce of ``n`` bytes over ``P`` ranks costs, with latency ``a`` and bandwidth ``b``
  (Thakur, Rabenseifner & Gropp 2005): ring ``2(P-1) a + 2(P-1)/P n/b``, tree (binomial reduce
  and broadcast) ``2 log2(P) (a + n/b)``, Rabenseifner (halving-doubling)
  ``2 log2(P) a + 2(P-1)/P n/b``; ``auto`` takes the cheapest, as MPI libraries choose by size.
* Blocking algorithms wait for the slowest rank: synchronous SGD's step is ``E[max over N of c]``
  plus the gradient allreduce; K-AVG's (local-sgd) period of K steps ``E[max over N of a K-step
  sum]`` plus the model's allreduce; Hier-AVG's global period ``E[max over groups of the sum over
  K2 group periods of E[max over S of a K1-step sum]]`` plus ``K2 - 1`` group allreduces over S
  ranks and one over all N (Zhou & Cong 2019).
* Non-blocking algorithms (lasgd, local-async, hier-avg ``--hier-mode nonblocking``) never wait:
  with the job's budget (the default) every node steps at its own pace; each averaging round
  costs a node ``round_overhead_s`` of compute (the snapshot and the delta's passes over the
  model; default six passes at ``--mem-gbs``). The allreduce runs behind the steps: a round
  completes after the allreduce plus the wait for the last rank to post, so rounds happen every
  ``K_eff = max(K, that / c)`` steps (reported: averaging is that much rarer, which is the
  price of the overlap for convergence, not for samples/s).
* Efficiency is samples/s over N times one node's samples/s with the same compute
  distribution (stragglers included), so it measures what the algorithm loses to waiting and
  communication, not the stragglers' own slowness.

``--calibrate RUN_DIR...`` fits the machine's figures from measured runs: the compute time per
node step and its shape from ``--algo none`` runs (at each world size measured; any run's own
step time otherwise), latency and bandwidth by least squares on the blocking runs (sync,
local-sgd, hier-avg), the round overhead from the non-blocking runs. ``--validate`` predicts
each measured run from a fit to all the others (leave one out) and reports the errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_asgd.errors import HpcAsgdError
from hpc_asgd.tools import safe_io as sio

ALGOS = ("none", "sync", "local-sgd", "lasgd", "local-async", "hier-avg", "hier-avg-nb")
BLOCKING = ("sync", "local-sgd", "hier-avg")
NONBLOCKING = ("lasgd", "local-async", "hier-avg-nb")
ROUNDS = ("averaging_rounds", "group_rounds")  # summary.json: per rank, global and group
PASSES = 6  # a round's passes over the model: snapshot, copies, mean - x_s, add to the model


class PredictError(HpcAsgdError):
    """A run folder that cannot calibrate, or an impossible request."""


@dataclass(frozen=True)
class Interconnect:
    name: str
    latency_s: float  # per message, MPI point to point across the fabric
    bandwidth: float  # bytes/s a rank sends (and receives) at once, effective
    note: str


# Effective figures: the line rate less protocol overhead; latencies of MPI across a switch.
INTERCONNECTS = {
    "ndr400": Interconnect(
        "NDR 400 Gb/s InfiniBand", 2e-6, 45e9, "400 Gb/s line rate (50 GB/s), 90% effective"
    ),
    "hdr200": Interconnect(
        "HDR 200 Gb/s InfiniBand", 2e-6, 22.5e9, "200 Gb/s line rate (25 GB/s), 90% effective"
    ),
    "25gbe": Interconnect(
        "25 Gb/s Ethernet, TCP", 25e-6, 2.8e9, "25 Gb/s (3.125 GB/s), ~90% through TCP"
    ),
    "1gbe": Interconnect("1 Gb/s Ethernet, TCP", 50e-6, 0.117e9, "1 Gb/s (125 MB/s), TCP"),
}


@dataclass(frozen=True)
class Workload:
    """What a node computes and what a round moves."""

    name: str
    params: int  # gradient elements (sync allreduces them, float32)
    floats: int  # the averaged model: parameters and float buffers (float32)
    step_s: float  # mean seconds per node step
    batch: int  # samples per node step
    note: str = ""


# Assumptions, not measurements: the step times are of the order of one current GPU.
WORKLOADS = {
    "resnet50": Workload(
        "ResNet-50 (ImageNet)",
        25_557_032,  # torchvision's; + BatchNorm running means and variances (53,120 each)
        25_663_272,
        0.100,
        64,
        "batch 64 per node at 100 ms a step (640 images/s, a data-centre GPU in FP32/TF32)",
    ),
    "resnet20": Workload(
        "ResNet-20 (CIFAR)",
        269_722,  # hpc_asgd's --model resnet20, 10 classes
        271_098,
        0.015,
        128,
        "batch 128 per node at 15 ms a step",
    ),
}


def allreduce_coefficients(p: int, how: str) -> tuple[float, float]:
    """(latency terms, bytes terms) of one allreduce over ``p`` ranks: its time is
    ``lat * latency + by * nbytes / bandwidth``."""
    if p <= 1:
        return 0.0, 0.0
    lg = math.ceil(math.log2(p))
    return {
        "ring": (2.0 * (p - 1), 2.0 * (p - 1) / p),
        "tree": (2.0 * lg, 2.0 * lg),
        "rabenseifner": (2.0 * lg, 2.0 * (p - 1) / p),
    }[how]


KINDS = ("ring", "tree", "rabenseifner")


def chosen(nbytes: float, p: int, latency: float, bandwidth: float, how: str) -> str:
    """The allreduce algorithm ``how`` names; ``auto``: the cheapest for this size."""
    if how != "auto":
        return how

    def cost(kind: str) -> float:
        lat, by = allreduce_coefficients(p, kind)
        return lat * latency + by * nbytes / bandwidth

    return min(KINDS, key=cost)


def allreduce_s(
    nbytes: float, p: int, latency: float, bandwidth: float, how: str = "auto"
) -> float:
    """Seconds of one allreduce of ``nbytes`` over ``p`` ranks."""
    lat, by = allreduce_coefficients(p, chosen(nbytes, p, latency, bandwidth, how))
    return lat * latency + by * nbytes / bandwidth


@dataclass
class Compute:
    """The compute time of a node step: its mean and a shape (relative draws, mean 1)."""

    mean_s: float
    shape: np.ndarray  # (M,) relative step times, mean 1
    straggler_rate: float = 0.0
    straggler_factor: float = 2.0
    draws: int = 1 << 15
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def lognormal(mean_s: float, cv: float, **kw) -> Compute:
        rng = np.random.default_rng(kw.get("seed", 0))
        sigma = math.sqrt(math.log1p(cv * cv))
        x = rng.lognormal(-sigma * sigma / 2, sigma, 1 << 15) if cv > 0 else np.ones(1)
        return Compute(mean_s, x / x.mean(), **kw)

    @staticmethod
    def from_hist(mean_s: float, hist: list[int], **kw) -> Compute:
        """The shape of a measured step-time histogram (``summary.json``), its bins' middles."""
        from hpc_asgd.stats import step_bin_seconds

        counts = np.asarray(hist, dtype=np.float64)
        if counts.sum() <= 0:
            return Compute.lognormal(mean_s, 0.0, **kw)
        rng = np.random.default_rng(kw.get("seed", 0))
        values = np.array([step_bin_seconds(k) for k in range(len(counts))])
        # a draw spreads across its half-octave bin (log-uniform), not on its middle
        x = rng.choice(values, size=1 << 15, p=counts / counts.sum())
        x = x * 2.0 ** (rng.random(x.size) / 2 - 0.25)
        return Compute(mean_s, x / x.mean(), **kw)

    @property
    def step_mean_s(self) -> float:
        """Mean seconds of a node step, stragglers included."""
        return self.mean_s * (1 + self.straggler_rate * (self.straggler_factor - 1))

    def sums(self, k: int) -> np.ndarray:
        """(draws,) seconds of K consecutive node steps of one node."""
        key = ("sum", k)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, k])
            total = np.zeros(self.draws)
            for _ in range(k):
                x = self.shape[rng.integers(self.shape.size, size=self.draws)]
                if self.straggler_rate > 0:
                    x = np.where(
                        rng.random(self.draws) < self.straggler_rate, x * self.straggler_factor, x
                    )
                total += x
            self._cache[key] = np.sort(total * self.mean_s)
        return self._cache[key]

    def max_of(self, n: int, k: int) -> float:
        """E[max over ``n`` nodes of a K-step sum]."""
        return expected_max(self.sums(k), n)

    def max_of_groups(self, groups: int, size: int, k1: int, k2: int) -> float:
        """E[max over groups of (sum over k2 periods of the max over the group of K1-sums)]."""
        key = ("hier", groups, size, k1, k2)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, size, k1, k2])
            s = self.sums(k1)
            if size > 1:  # draws of the max over the group (the order-statistic CDF inverted)
                s = np.quantile(s, rng.random(self.draws) ** (1.0 / size))
            z = np.zeros(self.draws)
            for _ in range(k2):
                z += s[rng.integers(s.size, size=self.draws)]
            self._cache[key] = expected_max(np.sort(z), groups)
        return self._cache[key]


def expected_max(sorted_draws: np.ndarray, n: int) -> float:
    """E[max of n independent draws] of the empirical distribution ``sorted_draws`` (sorted):
    the i-th smallest is the maximum with probability (i/M)^n - ((i-1)/M)^n."""
    m = sorted_draws.size
    if n <= 1:
        return float(sorted_draws.mean())
    cdf = (np.arange(1, m + 1) / m) ** n
    weights = np.diff(np.concatenate(([0.0], cdf)))
    return float(weights @ sorted_draws)


@dataclass
class Machine:
    """The figures of a machine: its interconnect and its nodes' compute."""

    latency_s: float
    bandwidth: float
    compute: Compute
    round_overhead_s: float
    allreduce: str = "auto"
    source: str = ""


@dataclass(frozen=True)
class Algo:
    """One configuration to predict: the algorithm and its periods."""

    algo: str
    period: int = 8  # K (local-sgd, lasgd, local-async)
    local_period: int = 2  # K1 (hier-avg)
    global_period: int = 4  # K2 (hier-avg): global every K1*K2 steps
    group_size: int = 8  # S (hier-avg)

    def label(self) -> str:
        if self.algo in ("none", "sync"):
            return self.algo
        if self.algo.startswith("hier-avg"):
            return f"{self.algo} S={self.group_size} K1={self.local_period} K2={self.global_period}"
        return f"{self.algo} K={self.period}"


@dataclass
class Prediction:
    algo: str
    label: str
    nodes: int
    step_s: float  # seconds per node step, on average
    samples_per_s: float
    efficiency: float
    comm_s: float  # seconds per node step in (or, non-blocking, behind) communication
    effective_period: float | None = None  # non-blocking: steps between rounds
    # a run's end, past its steps: a non-blocking rank drains the round in flight and the one
    # that agrees every rank has finished (what a short run measures, not the steady state)
    tail_s: float = 0.0


def predict(a: Algo, n: int, m: Machine, floats: int, params: int, batch: int) -> Prediction:
    """samples/s and efficiency of ``a`` on ``n`` nodes of machine ``m`` (see the module)."""
    c = m.compute
    mean = c.step_mean_s
    model_b, grad_b = 4.0 * floats, 4.0 * params

    def ar(nbytes: float, p: int) -> float:
        return allreduce_s(nbytes, p, m.latency_s, m.bandwidth, m.allreduce)

    k_eff, tail = None, 0.0
    if a.algo == "none" or (n == 1 and a.algo not in NONBLOCKING):
        step, comm = mean, 0.0
    elif a.algo == "sync":
        comm = ar(grad_b, n)
        step = c.max_of(n, 1) + comm
    elif a.algo == "local-sgd":
        comm = ar(model_b, n) / a.period
        step = c.max_of(n, a.period) / a.period + comm
    elif a.algo == "hier-avg":
        s = min(a.group_size, n)
        if n % s:
            raise PredictError(f"hier-avg: group size {s} does not divide {n} nodes")
        k1, k2 = a.local_period, a.global_period
        comm = ((k2 - 1) * ar(model_b, s) + ar(model_b, n)) / (k1 * k2)
        step = c.max_of_groups(n // s, s, k1, k2) / (k1 * k2) + comm
    else:  # non-blocking: a round every K steps, or as soon as the last one completes
        if a.algo == "hier-avg-nb":
            s = min(a.group_size, n)
            k, p = a.local_period, s  # the group's rounds set the pace; global ones ride along
            rounds_per_k = 1 + 1 / a.global_period
        else:
            k, p, rounds_per_k = a.period, n, 1.0
        behind = ar(model_b, p) + (c.max_of(p, k) - c.sums(k).mean())  # until the last posts
        k_eff = max(float(k), behind / mean) if p > 1 else float(k)
        comm = behind / k_eff
        tail = behind + ar(model_b, p) if p > 1 else 0.0
        step = mean + (m.round_overhead_s * rounds_per_k / k_eff if p > 1 else 0.0)
    rate = n * batch / step
    return Prediction(a.algo, a.label(), n, step, rate, mean / step, comm, k_eff, tail)


# ---- calibration from runs -------------------------------------------------------------------


@dataclass
class Run:
    """What the model needs of one measured run (``summary.json``)."""

    path: Path
    algo: str  # hier-avg-nb for the non-blocking mode
    nodes: int
    algo_cfg: Algo
    batch: int
    floats: int
    params: int
    samples_per_s: float
    step_s: float  # measured seconds per node step (the job's samples/s turned round)
    own_step_s: float  # mean over ranks of a rank's own step (train - comm wait) / steps
    steps: float  # node steps per rank, on average
    step_mean_s: float  # the run's own compute per node step (summary.json step_time_s)
    hist: list[int]
    rounds: float  # averaging rounds, global and group, per rank


def load_run(path: Path) -> Run:
    """The run in folder ``path``; a :class:`PredictError` names the first field it cannot use
    (each checked for its type and range: the folder's contents are anyone's)."""
    from hpc_asgd.stats import STEP_BINS

    f = Path(path) / "summary.json"
    try:
        s = sio.parse_json(sio.read_text(f, PredictError), "not valid JSON", PredictError)
    except PredictError as e:
        why = str(e).removeprefix(f"{sio.shown(f)}: ")
        raise PredictError(f"{sio.shown(path)}: no readable summary.json: {why}") from None
    if not isinstance(s, dict) or "model_floats" not in s or "step_time_hist" not in s:
        raise PredictError(
            f"{sio.shown(path)}: summary.json has no model_floats / step_time_hist (not written by "
            "this hpc_asgd, or by an older one): run it again"
        )
    try:
        cfg = sio.mapping(s["config"], "config")
        algo = sio.text(s["algo"], "algo")
        if algo == "hier-avg" and cfg.get("hier_mode") == "nonblocking":
            algo = "hier-avg-nb"
        if algo not in ALGOS:
            raise PredictError(
                f"{sio.shown(path)}: algo {algo!r} is not one the model knows ({ALGOS})"
            )
        n = sio.number(s["world_size"], "world_size", 1, sio.MAX_RANKS, integer=True)
        steps = sio.numbers(s["steps_taken"], "steps_taken", 1)
        train, wait = (
            sio.numbers(s["train_s"], "train_s"),
            sio.numbers(s["comm_wait_s"], "comm_wait_s"),
        )
        batch = sio.number(cfg["batch_size"], "config.batch_size", 1, 10**9, integer=True)
        groups = s.get("groups") or [[0] * n]  # hier-avg: the groups it formed (world ranks)
        periods = [cfg.get(k) or 1 for k in ("period", "local_period", "global_period")]
        for k, v in zip(("period", "local_period", "global_period"), periods, strict=True):
            sio.number(v, f"config.{k}", 1, 4096, integer=True)  # K draws a step to simulate
        size = sio.number(
            cfg.get("group_size") or len(groups[0]), "group_size", 1, sio.MAX_RANKS, integer=True
        )
        a = Algo(algo, periods[0], periods[1], periods[2], size)
        rate = sio.number(s["samples_per_s"], "samples_per_s", 1e-9, sio.BIG)
        step_s = sio.numbers(s["step_time_s"], "step_time_s", 1e-9)
        if not (steps and step_s):
            raise ValueError("steps_taken and step_time_s must not be empty")
        own = float(np.mean([(t - w) / x for t, w, x in zip(train, wait, steps, strict=True)]))
        if not own > 0:
            raise ValueError("train_s less comm_wait_s per step is not > 0")
        rounds = [sio.number(s.get(k), k, 0, sio.BIG, null=True) for k in ROUNDS]
        hist = sio.numbers(s["step_time_hist"], "step_time_hist", integer=True, most=STEP_BINS)
        w = sio.number(s.get("workers_per_rank"), "workers_per_rank", 1, sio.MAX_RANKS, null=True)
        return Run(
            Path(path),
            algo,
            n,
            a,
            batch,
            sio.number(s["model_floats"], "model_floats", 1, 1e13, integer=True),
            sio.number(s["model_params"], "model_params", 1, 1e13, integer=True),
            rate,
            n * batch / rate,
            own,
            float(np.mean(steps)),
            float(np.mean(step_s)) / (w or 1),
            hist + [0] * (STEP_BINS - len(hist)),
            float(sum(x or 0 for x in rounds)),
        )
    except KeyError as e:
        raise PredictError(f"{sio.shown(path)}: summary.json has no field {e}") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise PredictError(
            f"{sio.shown(path)}: summary.json has a field the model cannot use ({e})"
        ) from None


def compute_for(runs: list[Run], n: int, **kw) -> Compute:
    """The compute distribution at ``n`` nodes: from ``--algo none`` runs at that world size
    (on a shared machine the compute time depends on it), else the nearest one, else every
    run's own step time."""
    base = [r for r in runs if r.algo == "none"] or runs
    if not base:
        raise PredictError("--calibrate: no run to take the compute time from")
    near = min(abs(r.nodes - n) for r in base)
    pick = [r for r in base if abs(r.nodes - n) == near]
    mean = float(np.mean([r.own_step_s for r in pick]))  # each rank's own, on average
    hist = np.sum([r.hist for r in pick], axis=0).tolist()
    return Compute.from_hist(mean, hist, **kw)


def own_compute(runs: list[Run]) -> Compute:
    """The compute distribution the runs themselves measured (repeats of one configuration):
    their steps' own time (``step_time_s``, without waits) and histogram."""
    hist = np.sum([r.hist for r in runs], axis=0).tolist()
    return Compute.from_hist(float(np.mean([r.step_mean_s for r in runs])), hist)


def calibrate(runs: list[Run], how: str = "auto", own: bool = False, **kw) -> dict[int, Machine]:
    """A machine per world size measured (their compute differs on a shared host; the
    network figures and the round overhead are fitted once, over all runs). ``own``: fit
    each run against its own steps' compute time instead of the ``--algo none`` runs'."""
    sizes = sorted({r.nodes for r in runs} | {1})
    computes = {n: compute_for(runs, n, **kw) for n in sizes}

    def compute(r: Run) -> Compute:
        return own_compute([r]) if own else computes[r.nodes]

    # Latency and 1/bandwidth, least squares on the blocking runs' step time less their
    # predicted compute (relative errors: each row divided by the run's step time).
    rows, ys = [], []
    for r in runs:
        if r.algo not in BLOCKING or r.nodes < 2:
            continue
        probe = Machine(0.0, math.inf, compute(r), 0.0, how)
        free = predict(r.algo_cfg, r.nodes, probe, r.floats, r.params, r.batch).step_s
        rows.append(np.array(coefficients(r, how)) / r.step_s)
        ys.append((r.step_s - free) / r.step_s)
    latency, inv_bw = fit_nonnegative(np.array(rows), np.array(ys)) if rows else (0.0, 0.0)
    bandwidth = 1.0 / inv_bw if inv_bw > 0 else math.inf
    over = []
    for r in runs:  # the round overhead: compute time the non-blocking runs lost per round
        if r.algo in NONBLOCKING and r.nodes > 1 and r.rounds > 0:
            probe = Machine(latency, bandwidth, compute(r), 0.0, how)
            p = predict(r.algo_cfg, r.nodes, probe, r.floats, r.params, r.batch)
            lost = r.step_s * r.steps - p.tail_s - p.step_s * r.steps
            over.append(max(0.0, lost / r.rounds))
    overhead = float(np.median(over)) if over else 0.0
    source = f"calibrated on {len(runs)} run(s)"
    return {n: Machine(latency, bandwidth, computes[n], overhead, how, source) for n in sizes}


def coefficients(r: Run, how: str) -> tuple[float, float]:
    """(latency, bytes/bandwidth) coefficients of a blocking run's communication per node step."""
    a, n = r.algo_cfg, r.nodes
    model_b, grad_b = 4.0 * r.floats, 4.0 * r.params
    kind = "rabenseifner" if how == "auto" else how  # (at 2 and 4 ranks auto's choice)

    def co(nbytes: float, p: int, per: float) -> tuple[float, float]:
        lat, by = allreduce_coefficients(p, kind)
        return lat / per, by * nbytes / per

    if r.algo == "sync":
        return co(grad_b, n, 1)
    if r.algo == "local-sgd":
        return co(model_b, n, a.period)
    s = min(a.group_size, n)
    per = a.local_period * a.global_period
    g, w = co(model_b, s, per), co(model_b, n, per)
    return ((a.global_period - 1) * g[0] + w[0], (a.global_period - 1) * g[1] + w[1])


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares ``x @ [a, b] ~ y`` with a, b >= 0 (two unknowns: try the free fit, then
    each one alone)."""
    best: tuple[float, tuple[float, float]] | None = None
    candidates = []
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    candidates.append((float(sol[0]), float(sol[1])))
    for j in (0, 1):
        col = x[:, j]
        v = float(col @ y / (col @ col)) if col @ col > 0 else 0.0
        candidates.append((v, 0.0) if j == 0 else (0.0, v))
    for a, b in candidates:
        if a < 0 or b < 0:
            continue
        err = float(np.sum((x @ np.array([a, b]) - y) ** 2))
        if best is None or err < best[0]:
            best = (err, (a, b))
    return best[1] if best else (0.0, 0.0)
