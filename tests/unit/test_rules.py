"""Update rules under real concurrency: spawned processes share one parameter vector.

Every update adds one constant to every parameter, so a consistent read sees all elements
equal; a torn read (a mix of two versions) does not. The final value counts the updates that
were applied, so a lost update shows too.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from hpc_asgd.shm import Hogwild, Leashed, Locked

N = 1 << 20  # 4 MiB of float32: one update takes long enough for readers to overlap it
STEPS = 120
WORKERS = 2


def _hammer(index: int, rule, out: torch.Tensor) -> None:
    torch.set_num_threads(1)
    rule.attach(index)
    ones = torch.ones(N)
    torn = applied = dropped = 0
    for _ in range(STEPS):
        p = rule.read()
        if p.min() != p.max():
            torn += 1
        res = rule.apply(-ones, lr=1.0)  # p += 1 everywhere
        applied += res.applied
        dropped += not res.applied
    out[index] = torch.tensor([torn, applied, dropped], dtype=torch.float64)


def _run(rule) -> tuple[int, int, int, torch.Tensor]:
    ctx = mp.get_context("spawn")
    out = torch.zeros((WORKERS, 3), dtype=torch.float64).share_memory_()
    procs = [ctx.Process(target=_hammer, args=(i, rule, out)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, p.exitcode
    rule.publish()
    torn, applied, dropped = (int(v) for v in out.sum(0).tolist())
    return torn, applied, dropped, rule.params


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


@pytest.mark.timeout(180)
def test_leashed_persistence_bound_accounts_for_every_gradient() -> None:
    torn, applied, dropped, params = _run(_rule("leashed", persistence=1))
    assert torn == 0
    assert applied + dropped == WORKERS * STEPS  # every gradient applied or dropped, none lost
    assert torch.all(params == applied)  # and exactly the applied ones are in the model


@pytest.mark.timeout(180)
def test_hogwild_tears_are_measured() -> None:
    """HOGWILD! may tear reads and lose updates (that is its bargain): measured, not forbidden."""
    torn, applied, dropped, params = _run(_rule("hogwild"))
    assert applied == WORKERS * STEPS and dropped == 0
    lost = applied - float(params.min())
    print(f"hogwild: {torn} torn reads of {applied}, up to {lost:g} updates lost per element")
    assert 0 <= lost <= applied


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
    from hpc_asgd.shm.base import AtomicArray

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
