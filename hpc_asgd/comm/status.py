"""Who is stuck? A tiny TCP status service per rank, outside MPI.

Each rank's process runs a daemon thread that answers one question over a socket: how many
collectives it has entered on communicator ``cid``. A rank whose deadline passes asks every
peer: a peer that does not answer (dead, SIGSTOP-ed, frozen) or answers with a lower count
(still computing, or stuck in another collective) did not arrive. Plain sockets keep MPI out
of every thread but the main one, which some MPI builds need (concurrent progress from a
second thread crashed Open MPI 5's shared-memory transport here). The service listens on the
address the host's name resolves to, and answers only requests that carry the job's token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_HOST_BYTES = 56
_NONCE_BYTES = 16
RECORD = _HOST_BYTES + 8 + _NONCE_BYTES  # host name, port, this rank's share of the job token


def bind_address() -> str:
    """The address peers reach this host on: its name, resolved as they resolve it (they
    connect by name, as MPI's and Gloo's bootstraps do); every interface only when the name
    does not resolve."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


class StatusServer(threading.Thread):
    """Answers ``b"<token> <cid>\n"`` with ``b"<count>\n"`` (``-1`` for an unknown
    communicator). Requests without the job's token (or before it is known) get no answer:
    the port is open on the node's network, and only the job's ranks may read its progress."""

    def __init__(self, lookup: Callable[[int], int], host: str | None = None):
        super().__init__(name="hpc_asgd-status", daemon=True)
        self.lookup = lookup
        self.token: bytes | None = None  # set once the ranks have exchanged their records
        self.sock = socket.create_server((bind_address() if host is None else host, 0), backlog=64)
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
                    token, cid = conn.makefile("rb").readline().split()
                    if self.token is None or not hmac.compare_digest(token, self.token):
                        continue
                    conn.sendall(f"{self.lookup(int(cid))}\n".encode())
                except (OSError, ValueError):
                    continue


def encode_address(port: int) -> bytes:
    """This host's name, the server's port and a fresh random share of the job's token, as a
    fixed-size record for an allgather (every rank then derives the token: :func:`job_token`)."""
    return encode_peer((socket.gethostname(), port))[: _HOST_BYTES + 8] + os.urandom(_NONCE_BYTES)


def encode_peer(address: tuple[str, int]) -> bytes:
    """A known peer's (host, port) as a record, with no share of the token (a joining rank
    receives the members' table so: ``comm.mpi.join``)."""
    host = address[0].encode()[:_HOST_BYTES]
    return host.ljust(_HOST_BYTES, b"\0") + address[1].to_bytes(8, "little") + bytes(_NONCE_BYTES)


def decode_address(record: bytes) -> tuple[str, int]:
    host = record[:_HOST_BYTES].rstrip(b"\0").decode()
    return host, int.from_bytes(record[_HOST_BYTES : _HOST_BYTES + 8], "little")


def job_token(records: list[bytes]) -> bytes:
    """The job's token: a hash of every rank's random share, the same on every rank that saw
    the gathered records (which travelled only over the job's own communicator)."""
    shares = b"".join(r[_HOST_BYTES + 8 : RECORD] for r in records)
    return hashlib.sha256(shares).hexdigest().encode()


def ask(address: tuple[str, int], cid: int, timeout: float, token: bytes) -> int | None:
    """The peer's collective count on ``cid``, or None if it does not answer in time."""
    try:
        with socket.create_connection(address, timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(token + f" {cid}\n".encode())
            line = s.makefile("rb").readline()
        return int(line.strip())
    except (OSError, ValueError):
        return None


def ask_all(
    addresses: dict[int, tuple[str, int]], cid: int, timeout: float, token: bytes
) -> dict[int, int | None]:
    """Ask every peer at once; ``{rank: count or None}`` within about ``timeout`` seconds."""
    if not addresses:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(addresses))) as pool:
        futures = {r: pool.submit(ask, a, cid, timeout, token) for r, a in addresses.items()}
        return {r: f.result() for r, f in futures.items()}
