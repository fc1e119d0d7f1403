"""World size 1: every collective is the identity, so one process runs the same code path."""

from __future__ import annotations

import sys

import torch

from hpc_asgd.comm.base import check_op


class DoneWork:
    """A collective that completed when it was posted."""

    def test(self) -> bool:
        return True

    def wait(self, timeout: float | None = None, waited: float = 0.0) -> None:
        return None


class LocalComm:
    name = "local"
    rank = 0
    size = 1

    def __init__(self, timeout: float = 300.0):
        self.timeout = timeout
        self.world_ranks = [0]

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> None:
        check_op(op)

    def iallreduce_(self, t: torch.Tensor, op: str = "sum") -> DoneWork:
        check_op(op)
        return DoneWork()

    def bcast_(self, t: torch.Tensor, root: int = 0) -> None:
        return None

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).clone()

    def barrier(self) -> None:
        return None

    def split(self, color: int, key: int) -> LocalComm:
        return self

    def split_node(self) -> LocalComm:
        return self

    def abort(self, code: int = 1) -> None:
        sys.exit(code)
