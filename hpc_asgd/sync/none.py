"""``--algo none``: ranks train independently from the same start (a baseline and W-scaling)."""

from __future__ import annotations

from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.base import Averaging


@SYNCHRONIZERS.register("none")
class NoSync(Averaging):
    promises_consensus = False
