"""``--algo none``: ranks train independently from the same start (a baseline and W-scaling).

In a loop of your own, ``hpc_asgd.NoSync(model, opt, comm)`` gives the same start and the same
figures as the other synchronisers, and no averaging."""

from __future__ import annotations

from hpc_asgd.registry import SYNCHRONIZERS
from hpc_asgd.sync.base import Averaging


@SYNCHRONIZERS.register("none")
class NoSync(Averaging):
    promises_consensus = False
