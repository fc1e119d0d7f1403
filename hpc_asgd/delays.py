"""Injected delays, as a real cluster's (``--delay``, ``--pause-rank/--pause-at/--pause-s``).

Besides the fixed straggler (``--slow-rank R --slow-factor F``, in ``step.Stepper``), two
kinds of delay that shared clusters show:

- random per-step delays on every rank and worker (``--delay exp:MEAN_MS`` or
  ``--delay lognormal:MEAN_MS[:SIGMA]``): a sleep after each step's work, drawn from an
  exponential or a log-normal distribution of mean MEAN_MS milliseconds. LASGD's experiments
  (Avidor, Tal-Israel et al., "Locally Asynchronous Stochastic Gradient Descent for
  Decentralised Deep Learning", arXiv 2203.13085) injected such random delays into every
  worker to show that local steps which never wait tolerate them;
- a one-off pause (a node hiccup: swapping, a noisy neighbour, a file-system stall): rank R
  sleeps T seconds once, at node step N.

The draws come from a ``random.Random`` of their own, seeded from ``--seed``, the rank and the
worker: the sequence is reproducible, differs between ranks and workers, and leaves torch's
RNG streams (model initialisation, data order, augmentation) exactly as without delays.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from typing import Any

from hpc_asgd.errors import ConfigError

DISTRIBUTIONS = ("exp", "lognormal")
LOGNORMAL_SIGMA = 1.0  # default sigma of log(delay): a heavy tail (the p99 is ~4x the mean)
_SPEC = re.compile(r"(exp|lognormal):([^:]+)(?::([^:]+))?")
_USAGE = "delay: expected exp:MEAN_MS or lognormal:MEAN_MS[:SIGMA]"


def parse_delay(spec: str) -> tuple[str, float, float] | None:
    """``--delay`` as ``(distribution, mean in seconds, sigma)``; None for "" (no delay).
    Raises ConfigError naming the field for anything else."""
    if not spec:
        return None
    m = _SPEC.fullmatch(spec.strip())
    if m is None or (m[1] == "exp" and m[3] is not None):
        raise ConfigError(f"{_USAGE}, got {spec!r}")
    try:
        mean_ms = float(m[2])
        sigma = float(m[3]) if m[3] is not None else LOGNORMAL_SIGMA
    except ValueError:
        raise ConfigError(f"{_USAGE}, got {spec!r}") from None
    if not (math.isfinite(mean_ms) and mean_ms > 0):
        raise ConfigError(f"delay: the mean must be a positive number of ms, got {spec!r}")
    if not (math.isfinite(sigma) and 0 < sigma <= 5):
        raise ConfigError(f"delay: the log-normal sigma must be in (0, 5], got {spec!r}")
    return m[1], mean_ms / 1e3, sigma


def validate(cfg: Any, world_size: int) -> None:
    """The delay flags' own rules (called by the application's ``Config.validate``; ``cfg``
    is that configuration, read here by its field names only)."""
    r = cfg.run
    parse_delay(r.delay)
    if r.pause_rank < -1 or r.pause_rank >= world_size:
        raise ConfigError(
            f"pause_rank: {r.pause_rank} is not a rank of a {world_size}-rank job (-1: no pause)"
        )
    if r.pause_rank < 0:
        if r.pause_at or r.pause_s:
            raise ConfigError("pause_rank: --pause-at / --pause-s need --pause-rank R")
        return
    if r.pause_at < 1:
        raise ConfigError(f"pause_at: node steps count from 1, got {r.pause_at}")
    if not r.pause_s > 0:
        raise ConfigError(f"pause_s: --pause-rank needs a pause of > 0 s, got {r.pause_s}")
    stall = 0.75 * r.comm_timeout  # a worker in one step this long is taken for a hung one
    if r.pause_s >= stall:
        raise ConfigError(
            f"pause_s: a {r.pause_s:g} s pause would trip the stall deadline ({stall:g} s, "
            f"3/4 of --comm-timeout {r.comm_timeout:g}); raise --comm-timeout"
        )


class Delays:
    """The delays one worker (or the rank's own process, worker 0) sleeps after its steps.

    ``after(s)`` is called once the work of node step ``s`` (0-based; the step named ``s + 1``)
    is done: it sleeps a random delay if ``--delay`` is set, and the pause if this is the
    pause's rank and ``s + 1 == --pause-at``. With W workers each node step is taken by one
    worker, so exactly one of them pauses. ``sleep`` is injectable (tests)."""

    def __init__(
        self,
        dist: str | None,
        mean_s: float,
        sigma: float,
        seed: int,
        rank: int,
        worker: int,
        pause_at: int = 0,
        pause_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.dist, self.mean_s, self.sigma = dist, mean_s, sigma
        self.rng = random.Random(f"hpc_asgd.delays/{seed}/{rank}/{worker}")  # str: sha512 seed
        self.rng_key = (seed, rank)
        self.mu = math.log(mean_s) - sigma * sigma / 2 if dist == "lognormal" else 0.0
        self.pause_at, self.pause_s = pause_at, pause_s
        self.sleep = sleep
        self.slept_s = 0.0  # everything slept so far
        self.paused = False

    @classmethod
    def from_config(
        cls, cfg: Any, rank: int, worker: int, sleep: Callable[[float], None] = time.sleep
    ) -> Delays | None:
        """This rank and worker's delays from the application's configuration (its run
        fields, by name); None when there are none to inject."""
        r = cfg.run
        parsed = parse_delay(r.delay)
        pausing = r.pause_rank == rank and r.pause_s > 0
        if parsed is None and not pausing:
            return None
        dist, mean_s, sigma = parsed or (None, 0.0, 0.0)
        at, pause = (r.pause_at, r.pause_s) if pausing else (0, 0.0)
        return cls(dist, mean_s, sigma, r.seed, rank, worker, at, pause, sleep)

    def for_worker(self, worker: int) -> Delays:
        """The same delays for another worker of this rank: its own random sequence, the
        same pause (which only the worker that takes its node step sleeps)."""
        seed, rank = self.rng_key
        return Delays(
            self.dist, self.mean_s, self.sigma, seed, rank, worker,
            self.pause_at, self.pause_s, self.sleep,
        )  # fmt: skip

    def draw(self) -> float:
        """The next random delay in seconds (0 without ``--delay``)."""
        if self.dist == "exp":
            return self.rng.expovariate(1.0 / self.mean_s)
        if self.dist == "lognormal":
            return self.rng.lognormvariate(self.mu, self.sigma)
        return 0.0

    def after(self, s: int) -> float:
        """Sleep what is due after node step ``s`` (0-based); returns the seconds slept."""
        t = self.draw()
        if self.pause_at and s + 1 == self.pause_at and not self.paused:
            self.paused = True
            t += self.pause_s
        if t > 0:
            self.sleep(t)
            self.slept_s += t
        return t
