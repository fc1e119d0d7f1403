"""Who is stuck? A tiny TCP status service per rank, outside MPI.

Each rank's process runs a daemon thread that answers one question over a socket: how many
collectives it has entered on communicator ``cid``. A rank whose deadline passes asks every
peer: a peer that does not answer (dead, SIGSTOP-ed, frozen) or answers with a lower count
(still computing, or stuck in another collective) did not arrive. Plain sockets keep MPI out
of every thread but the main one, which some MPI builds need (concurrent progress from a
second thread crashed Open MPI 5's shared-memory transport here).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_HOST_BYTES = 64


class StatusServer(threading.Thread):
    """Answers ``b"<cid>\\n"`` with ``b"<count>\\n"`` (``-1`` for an unknown communicator)."""

    def __init__(self, lookup: Callable[[int], int]):
        super().__init__(name="hpc_asgd-status", daemon=True)
        self.lookup = lookup
        self.sock = socket.create_server(("", 0), backlog=64)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(1.0)
                    cid = int(conn.makefile("rb").readline().strip() or b"-1")
                    conn.sendall(f"{self.lookup(cid)}\n".encode())
                except (OSError, ValueError):
                    continue


def encode_address(port: int) -> bytes:
    """This host's name and the server's port, as a fixed-size record for an allgather."""
    host = socket.gethostname().encode()[: _HOST_BYTES - 8]
    return host.ljust(_HOST_BYTES - 8, b"\0") + port.to_bytes(8, "little")


def decode_address(record: bytes) -> tuple[str, int]:
    host = record[: _HOST_BYTES - 8].rstrip(b"\0").decode()
    return host, int.from_bytes(record[_HOST_BYTES - 8 :], "little")


RECORD = _HOST_BYTES


def ask(address: tuple[str, int], cid: int, timeout: float) -> int | None:
    """The peer's collective count on ``cid``, or None if it does not answer in time."""
    try:
        with socket.create_connection(address, timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"{cid}\n".encode())
            line = s.makefile("rb").readline()
        return int(line.strip())
    except (OSError, ValueError):
        return None


def ask_all(
    addresses: dict[int, tuple[str, int]], cid: int, timeout: float
) -> dict[int, int | None]:
    """Ask every peer at once; ``{rank: count or None}`` within about ``timeout`` seconds."""
    if not addresses:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(addresses))) as pool:
        futures = {r: pool.submit(ask, a, cid, timeout) for r, a in addresses.items()}
        return {r: f.result() for r, f in futures.items()}
