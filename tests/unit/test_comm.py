"""Node awareness against a fake communicator: ranks are threads of this process, each with the
host name it is told to have (as ranks on emulated nodes are), meeting in a real allgather."""

from __future__ import annotations

import datetime
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from hpc_asgd import env
from hpc_asgd.comm import status, torch_dist
from hpc_asgd.comm.base import HOST_BYTES, gather_hosts, split_by_host, timeout_error
from hpc_asgd.errors import CommError, error_line


class ThreadComm:
    """Rank ``rank`` of a world whose ranks are threads sharing ``table`` (one slot each);
    ``split`` records its arguments instead of making a communicator."""

    name = "fake"
    timeout = 5.0

    def __init__(self, rank: int, table: list, barrier: threading.Barrier):
        self.rank, self.size, self.table, self.barrier = rank, len(table), table, barrier
        self.world_ranks = list(range(self.size))

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        self.table[self.rank] = t.clone()
        self.barrier.wait()  # every rank has written its slot
        out = torch.stack(self.table)
        self.barrier.wait()  # every rank has read them all
        return out

    def split(self, color: int, key: int) -> tuple[int, int]:
        return color, key


def _on_every_rank(hosts: list[str], fn):
    """``fn(comm, host)`` on every rank at once; the results in rank order."""
    table: list = [None] * len(hosts)
    barrier = threading.Barrier(len(hosts), timeout=10)
    comms = [ThreadComm(r, table, barrier) for r in range(len(hosts))]
    with ThreadPoolExecutor(len(hosts)) as pool:
        return list(pool.map(fn, comms, hosts))


def test_split_node_groups_ranks_by_host_name() -> None:
    """Two emulated nodes, ranks placed round-robin: one shared kernel, two nodes. Colors
    number the nodes in first-seen order; key = rank keeps the ranks' order within a node."""
    hosts = ["node1", "node2", "node1", "node2", "node3"]
    assert _on_every_rank(hosts, gather_hosts) == [hosts] * len(hosts)
    assert _on_every_rank(hosts, split_by_host) == [(0, 0), (1, 1), (0, 2), (1, 3), (2, 4)]
    # one node: one group, whatever the name
    assert _on_every_rank(["a.b.c"] * 3, split_by_host) == [(0, 0), (0, 1), (0, 2)]


def test_gathered_host_names_are_cut_to_the_record() -> None:
    long = "n" * (HOST_BYTES + 10)
    assert _on_every_rank([long, "x"], gather_hosts)[0] == ["n" * HOST_BYTES, "x"]


def test_errors_name_hosts_where_known() -> None:
    e = timeout_error("mpi", 0, "allreduce", 7, 4.0, [1, 3], {1: 5}, {1: "node2"})
    assert isinstance(e, CommError)
    assert str(e) == (
        "mpi allreduce #7 timed out after 4 s on rank 0: rank(s) 1 (node2), 3 did not arrive "
        "(out of step: rank 1 at #5) (--comm-timeout)"
    )
    assert "rank(s) 1 did not arrive" in str(timeout_error("gloo", 0, "barrier", 1, 2.0, [1]))
    assert error_line(1, 4, e, "node2").startswith("hpc-asgd: error on rank 1/4 (node2): mpi ")
    assert error_line(1, 4, ValueError("x")) == "hpc-asgd: error on rank 1/4: ValueError: x"


def test_status_service_answers_only_the_jobs_token() -> None:
    """The status port is open on the node's network: only the job's ranks may ask it."""
    records = [status.encode_address(1000 + r) for r in range(3)]
    token = status.job_token(records)
    assert token == status.job_token(list(records))  # every rank derives the same
    assert token != status.job_token([status.encode_address(1000 + r) for r in range(3)])
    assert status.decode_address(records[2]) == (socket.gethostname()[:56], 1002)
    server = status.StatusServer(lambda cid: 40 + cid)
    server.start()
    address = (socket.gethostname(), server.port)
    assert status.ask(address, 2, 1.0, token) is None  # token not known yet: no answer
    server.token = token
    assert status.ask(address, 2, 1.0, token) == 42
    assert status.ask(address, 2, 1.0, b"0" * len(token)) is None
    with socket.create_connection(address, timeout=1.0) as s:  # the old, tokenless request
        s.sendall(b"2\n")
        assert s.makefile("rb").readline() == b""
    assert server.sock.getsockname()[0] == status.bind_address()
    server.sock.close()


_TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_torchrun_agent_store_is_read_from_torchelastic_variables() -> None:
    assert env.detect({**_TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"}).agent_store
    assert not env.detect({**_TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "False"}).agent_store
    assert not env.detect(_TORCHRUN).agent_store  # torchrun before the agent store: rank 0 hosts
    # Only torchrun's agent hosts a store: the variable means nothing to other launchers.
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert not env.detect({**mpi, "TORCHELASTIC_USE_AGENT_STORE": "True"}).agent_store


def test_rank0_joins_the_store_torchruns_agent_hosts(monkeypatch) -> None:
    """Under torchrun, rank 0 connects to the agent's store on MASTER_PORT instead of trying
    to host one there (which fails to bind and, with TORCHELASTIC_USE_AGENT_STORE, made torch
    log an alarming "[E ... TCPStore.cpp] ... has failed to bind" line before ignoring it)."""
    # Without the variable torch does not ignore the failed bind: hosting here would raise.
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    timeout = datetime.timedelta(seconds=10)
    agent = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timeout, wait_for_workers=False)
    agent.set("agent", "here")
    variables = {
        **_TORCHRUN,
        "MASTER_PORT": str(agent.port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    launch = env.detect(variables)
    store = torch_dist._connect_store(launch, "127.0.0.1", agent.port, timeout)
    assert store.get("agent") == b"here"  # the agent's store, not one of its own
    # Without the agent store, rank 0 hosts the store (on a port nobody holds; alone, so that
    # the host does not wait for a second rank).
    launch = env.detect({**variables, "WORLD_SIZE": "1", "TORCHELASTIC_USE_AGENT_STORE": "False"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own = torch_dist._connect_store(launch, "127.0.0.1", port, timeout)
    own.set("k", "v")
    assert own.get("k") == b"v" and not own.check(["agent"])


def test_gloo_groups_are_destroyed_before_the_interpreter_finalizes(tmp_path) -> None:
    """A Gloo thread that drops a finished collective's last tensor reference after Python began
    finalizing aborts the process ("terminate called without an active exception"): the
    engine's atexit handler destroys every group, sub-groups included, joining those threads
    first. Checked by a handler registered before ``init`` (atexit runs them last-in first-out).
    """
    import os
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, torch, torch.distributed as dist, hpc_asgd\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
        "comm = hpc_asgd.init('gloo')\n"
        "sub = comm.split(0, 0)\n"
        "t = torch.ones(1000)\n"
        "sub.iallreduce_(t).wait()\n"
        "comm.iallreduce_(t).wait()\n"
        "print('sum', float(t.sum()))\n"
    )
    with socket.socket() as s:  # a free port for the rendezvous of a world of one
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "sum 1000.0" in proc.stdout and "initialized at exit: False" in proc.stdout, proc.stdout
