"""Update rules for W workers sharing one model inside a rank, one file each, registered under
their ``--update`` name (``hpc_asgd.registry.UPDATE_RULES``); importing this package registers
the built-in ones."""

from __future__ import annotations

from typing import Any

import torch

from hpc_asgd.registry import UPDATE_RULES
from hpc_asgd.rules.base import Applied, AtomicArray, InPlace, UpdateRule
from hpc_asgd.rules.hogwild import Hogwild
from hpc_asgd.rules.leashed import Leashed
from hpc_asgd.rules.locked import Locked
from hpc_asgd.rules.partitioned import Partitioned


def make_rule(cfg: Any, params: torch.Tensor, ctx) -> UpdateRule:
    """The rule ``cfg`` (the application's configuration) names, over ``params`` (the shared
    flat buffer's parameter part)."""
    return UPDATE_RULES.get(cfg.workers.update).from_config(cfg, params, ctx)


__all__ = [
    "Applied",
    "AtomicArray",
    "Hogwild",
    "InPlace",
    "Leashed",
    "Locked",
    "Partitioned",
    "UpdateRule",
    "make_rule",
]
