"""Update rules under real concurrency: spawned processes share one parameter vector.

Every update adds one constant to every parameter, so a consistent read sees all elements
equal; a torn read (a mix of two versions) does not. The final value counts the updates that
were applied, so a lost update shows too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp

from hpc_asgd.rules import Hogwild, Leashed, Locked

N = 1 << 20  # 4 MiB of float32: one update takes long enough for readers to overlap it
STEPS = 120
WORKERS = 2


class _PairedCas:
    """The latest-version word of a Leashed rule whose CAS waits until every worker is at its
    own CAS. Each round the workers then CAS from the same version (see the persistence test),
    so exactly one wins: contention on every step, whatever the scheduler does."""

    def __init__(self, word, barrier):
        self.word, self.barrier = word, barrier

    def load(self) -> int:
        return self.word.load()

    def cas(self, expected: int, desired: int) -> bool:
        self.barrier.wait(60)  # BrokenBarrierError (worker exit 1) if the others never come
        return self.word.cas(expected, desired)


def _hammer(index: int, rule, out: torch.Tensor, barrier=None) -> None:
    torch.set_num_threads(1)
    rule.attach(index)
    if barrier is not None:
        paired = _PairedCas(rule.ctl[0], barrier)
        rule._latest = lambda: paired
    ones = torch.ones(N)
    torn = applied = dropped = max_tries = 0
    for _ in range(STEPS):
        p = rule.read()
        if p.min() != p.max():
            torn += 1
        res = rule.apply(-ones, lr=1.0)  # p += 1 everywhere
        applied += res.applied
        dropped += not res.applied
        max_tries = max(max_tries, res.tries)
    out[index] = torch.tensor([torn, applied, dropped, max_tries], dtype=torch.float64)


def _run(rule, barrier=None) -> tuple[int, int, int, torch.Tensor]:
    torn, applied, dropped, _, params = _run_tries(rule, barrier)
    return torn, applied, dropped, params


def _run_tries(rule, barrier=None) -> tuple[int, int, int, int, torch.Tensor]:
    """W processes hammer ``rule``: (torn reads, applied, dropped, max CAS tries, params)."""
    ctx = mp.get_context("spawn")
    out = torch.zeros((WORKERS, 4), dtype=torch.float64).share_memory_()
    procs = [ctx.Process(target=_hammer, args=(i, rule, out, barrier)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0, p.exitcode
    rule.publish()
    torn, applied, dropped, _ = (int(v) for v in out.sum(0).tolist())
    return torn, applied, dropped, int(out[:, 3].max()), rule.params


def _rule(kind: str, persistence: int = 0):
    params = torch.zeros(N).share_memory_()
    if kind == "hogwild":
        return Hogwild(params)
    if kind == "locked":
        return Locked(params, mp.get_context("spawn"))
    return Leashed(params, WORKERS, persistence)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["locked", "leashed"])
def test_consistent_rules_never_tear_nor_lose(kind: str) -> None:
    torn, applied, dropped, params = _run(_rule(kind))
    assert torn == 0, f"{kind}: {torn} torn reads"
    assert applied == WORKERS * STEPS and dropped == 0
    assert torch.all(params == applied), (params.min(), params.max(), applied)


@pytest.mark.timeout(240)
def test_leashed_persistence_bound_drops_under_contention() -> None:
    """B = 1 with every CAS contended: each round both workers copy the same version (the loser
    of the last round drops rather than retrying, and the winner's next read is its own
    version), so exactly one CAS per round wins. Half the gradients must be dropped at their
    first try; a rule that ignored B would retry (tries 2), never drop, and leave one worker
    at the barrier alone (a failed worker). Dropped ones must be absent from the model."""
    ctx = mp.get_context("spawn")
    rule = _rule("leashed", persistence=1)
    torn, applied, dropped, max_tries, params = _run_tries(rule, ctx.Barrier(WORKERS))
    assert torn == 0
    assert max_tries == 1, f"{max_tries} CAS tries with persistence B = 1"
    assert (applied, dropped) == (STEPS, (WORKERS - 1) * STEPS)  # one winner a round
    assert torch.all(params == applied)  # exactly the applied gradients are in the model


class _FailingCas:
    """The latest-version word with its first ``fails`` CASes failing, as if another writer
    had always published first. Raises once ``limit`` CASes were made (a bound ignored)."""

    def __init__(self, word, fails: int, limit: int = 50):
        self.word, self.fails, self.limit, self.calls = word, fails, limit, 0

    def load(self) -> int:
        return self.word.load()

    def cas(self, expected: int, desired: int) -> bool:
        self.calls += 1
        assert self.calls <= self.limit, f"{self.calls} CAS tries: the bound is not applied"
        return self.calls > self.fails and self.word.cas(expected, desired)


@pytest.mark.parametrize(
    ("bound", "fails", "applied"), [(3, 99, False), (3, 2, True), (0, 7, True)]
)
def test_leashed_cas_tries_never_exceed_persistence(bound: int, fails: int, applied: bool) -> None:
    """Tries count CAS attempts, the first included: with B = 3 and a CAS that keeps failing,
    the gradient is dropped after exactly 3 tries and the model is untouched; a third try that
    succeeds applies it; B = 0 retries until it wins."""
    params = torch.zeros(8)
    rule = Leashed(params, workers=1, persistence=bound)
    rule.attach(0)
    failing = _FailingCas(rule.ctl[0], fails)
    rule._latest = lambda: failing
    rule.read()
    res = rule.apply(-torch.ones(8), lr=1.0)
    assert (res.applied, res.tries, failing.calls) == (
        applied,
        min(fails + 1, bound or 99),
        res.tries,
    )
    rule.publish()
    assert torch.all(params == float(applied))
    if not applied:  # the kept slot serves the next gradient, which can still win
        failing.fails = 0
        rule.read()
        assert rule.apply(-torch.ones(8), lr=1.0).applied
        rule.publish()
        assert torch.all(params == 1)


@pytest.mark.timeout(180)
def test_hogwild_tears_are_measured() -> None:
    """HOGWILD! may tear reads and lose updates (that is its bargain): measured, not forbidden."""
    torn, applied, dropped, params = _run(_rule("hogwild"))
    assert applied == WORKERS * STEPS and dropped == 0
    lost = applied - float(params.min())
    print(f"hogwild: {torn} torn reads of {applied}, up to {lost:g} updates lost per element")
    assert 0 <= lost <= applied


def test_hogwild_reads_a_private_copy_with_several_workers() -> None:
    """W > 1: the gradient is computed on the worker's own copy of the shared vector (taken
    without a lock), while updates still land in the shared vector; W = 1 reads it in place."""
    params = torch.arange(6, dtype=torch.float32).share_memory_()
    rule = Hogwild(params, copy_reads=True)
    rule.attach(0)
    seen = rule.read()
    assert seen is not params and torch.equal(seen, params)
    res = rule.apply(torch.ones(6), lr=0.5)
    assert res.applied and torch.equal(params, torch.arange(6) - 0.5)
    assert torch.equal(seen, torch.arange(6, dtype=torch.float32))  # the copy did not move
    assert rule.read() is seen and torch.equal(seen, params)  # the same buffer, refreshed
    alone = Hogwild(params)
    alone.attach(0)
    assert alone.read() is params


def _count(index: int, cells, rounds: int) -> None:
    for _ in range(rounds):
        cells[0].fetch_inc()  # a plain counter
        while True:  # and one built from compare-and-swap, the way claim() takes steps
            v = cells[1].load()
            if cells[1].cas(v, v + 1):
                break


def test_atomic_words_lose_no_increment_across_processes() -> None:
    """Word semantics (the direct patomic calls), then 2 processes x 20,000 increments each
    of a fetch-add counter and of a CAS-loop counter: both end at exactly 40,000."""
    from hpc_asgd.rules.base import AtomicArray

    cells = AtomicArray(2)
    w = cells[0]
    assert (w.load(), w.fetch_inc(), w.fetch_dec(), w.load()) == (0, 0, 1, 0)
    assert not w.cas(5, 7) and w.load() == 0
    assert w.cas(0, -(1 << 40)) and int(cells.t[0]) == -(1 << 40)
    w.store(0)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count, args=(i, cells, 20_000)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, p.exitcode
    assert cells.t.tolist() == [40_000, 40_000]


@pytest.mark.parametrize("kind", ["hogwild", "locked"])
@pytest.mark.parametrize(("bound", "applied"), [(1, False), (2, True), (0, True)])
def test_max_staleness_drops_gradients_staler_than_s(kind: str, bound: int, applied: bool) -> None:
    """Worker 0 reads, worker 1 lands 2 updates, worker 0 applies: staleness 2. With S = 1 it
    is dropped and the model keeps exactly worker 1's updates; S = 2 and S = 0 (off) apply it."""
    params = torch.zeros(4)
    ctx = mp.get_context("spawn")
    rule = Hogwild(params, bound) if kind == "hogwild" else Locked(params, ctx, bound)
    other = copy.copy(rule)  # a second worker: same shared state, its own read version
    rule.attach(0)
    other.attach(1)
    rule.read()
    for _ in range(2):
        other.read()
        assert other.apply(-torch.ones(4), lr=1.0).applied  # fresh: never dropped
    res = rule.apply(-10 * torch.ones(4), lr=1.0)
    assert (res.applied, res.staleness) == (applied, 2)
    assert torch.all(params == (12 if applied else 2))


def test_max_staleness_config() -> None:
    """--max-staleness: >= 0, and only for the rules that implement it (one ConfigError line)."""
    from hpc_asgd.config import Config
    from hpc_asgd.errors import ConfigError
    from hpc_asgd.rules import make_rule

    for update in ("hogwild", "locked"):
        cfg = Config.from_flat({"update": update, "max_staleness": 3})
        cfg.validate(world_size=1)
        assert make_rule(cfg, torch.zeros(2), mp.get_context("spawn")).max_staleness == 3
    for values, message in [
        ({"max_staleness": -1}, "max_staleness: must be >= 0, got -1"),
        ({"update": "leashed", "max_staleness": 2}, r"not 'leashed' \(.*--persistence\)"),
        ({"update": "partitioned", "max_staleness": 2}, "not 'partitioned'"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            Config.from_flat(values).validate(world_size=1)
        assert "\n" not in str(err.value)
    Config.from_flat({"update": "leashed"}).validate(world_size=1)  # 0 = off: fine anywhere
