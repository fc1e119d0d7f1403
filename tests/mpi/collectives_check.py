"""Run under mpirun: the same collective checks for every engine. Exits non-zero on failure.

Usage: python tests/mpi/collectives_check.py ENGINE [timeout-check]
"""

from __future__ import annotations

import sys
import time

import torch

from hpc_asgd import env
from hpc_asgd.comm import make_comm
from hpc_asgd.errors import CommError


def check(engine: str) -> None:
    launch = env.detect()
    comm = make_comm(engine, launch, timeout=60.0)
    r, n = comm.rank, comm.size
    assert (r, n) == (launch.rank, launch.size), (r, n, launch)

    # allreduce: sum, max, min, in place, on a flat float32 buffer
    t = torch.full((1000,), float(r + 1))
    comm.allreduce_(t)
    assert torch.all(t == n * (n + 1) / 2), t[:3]
    t = torch.tensor([float(r), -float(r)])
    comm.allreduce_(t, op="max")
    assert t.tolist() == [n - 1, 0.0], t
    t = torch.tensor([float(r)])
    comm.allreduce_(t, op="min")
    assert t.item() == 0.0

    # a view into a bigger buffer is reduced in place (the flat model's parameter part)
    big = torch.full((10,), float(r))
    comm.allreduce_(big[2:6])
    assert big[2:6].tolist() == [sum(range(n))] * 4 and big[0] == r

    # non-blocking: completes while the caller computes, calling only test()
    buf = torch.full((1 << 20,), 1.0)
    work = comm.iallreduce_(buf)
    a = torch.randn(128, 128)
    deadline = time.monotonic() + 30
    done_while_computing = False
    while time.monotonic() < deadline:
        a = torch.tanh(a @ a)  # the "training" the collective overlaps with
        if work.test():
            done_while_computing = True
            break
    assert done_while_computing, "iallreduce did not complete while computing"
    work.wait()
    assert torch.all(buf == n)

    # broadcast from every root
    for root in range(n):
        t = torch.full((5,), float(r))
        comm.bcast_(t, root=root)
        assert torch.all(t == root), (root, t)

    # allgather in rank order
    g = comm.allgather(torch.tensor([r, 10 * r], dtype=torch.int64))
    assert g.tolist() == [[i, 10 * i] for i in range(n)], g

    comm.barrier()

    # split: even / odd ranks; ranks ordered by key
    sub = comm.split(r % 2, r)
    members = [i for i in range(n) if i % 2 == r % 2]
    assert sub.size == len(members) and sub.rank == members.index(r), (sub.rank, sub.size)
    t = torch.tensor([float(r)])
    sub.allreduce_(t)
    assert t.item() == sum(members), (t, members)

    # consecutive groups of 2 (hier-avg's documented groups) when n is even
    if n % 2 == 0:
        grp = comm.split(r // 2, r)
        t = torch.tensor([float(r)])
        grp.allreduce_(t)
        lo = 2 * (r // 2)
        assert t.item() == lo + lo + 1, t

    # node-local group: every rank of this test is on one machine
    node = comm.split_node()
    assert node.size == n and node.rank == r, (node.rank, node.size)
    comm.barrier()


def check_timeout(engine: str) -> None:
    """The last rank skips a collective; the others must name it within the deadline."""
    launch = env.detect()
    comm = make_comm(engine, launch, timeout=60.0)
    comm.barrier()
    t0 = time.monotonic()
    if comm.rank == comm.size - 1:
        time.sleep(8)  # never joins the allreduce below; stays alive to be named
        print("SKIPPER-DONE", flush=True)
        return
    try:
        comm.iallreduce_(torch.ones(4)).wait(2.0)
    except CommError as e:
        took = time.monotonic() - t0
        assert f"rank(s) {comm.size - 1} ({launch.hostname}) did not arrive" in str(e), str(e)
        assert took < 6, took
        print(f"NAMED rank {comm.rank}: {e}", flush=True)
        # Stay answerable while the other waiter diagnoses: a peer that has exited cannot say
        # that it did arrive (a CI run here saw rank 0 name rank 1, which had just left).
        time.sleep(max(0.0, 8 - (time.monotonic() - t0)))
        return
    raise AssertionError("the wait did not time out")


if __name__ == "__main__":
    which = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "timeout":
        check_timeout(which)
    else:
        check(which)
        print(f"OK {which}", flush=True)
