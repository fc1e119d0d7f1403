"""Your own model, dataset and loss, named as ``module:function`` (``--model my_pkg.nets:build``).

The module is imported from ``sys.path`` (``PYTHONPATH``, the current folder) by every process
that needs it: each rank, and each of its worker processes (which receive the name, never the
function's bytes). The contracts:

- model: ``build(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module`` with
  float32 parameters, called after ``torch.manual_seed(--seed)``;
- dataset: ``load(data_dir: str | None, seed: int)`` returning ``(train, test)`` or
  ``(train, test, num_classes)``, each split a pair of tensors ``(x (N, ...), y (N,))`` or a
  map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)``; ``num_classes`` defaults
  to the largest training label + 1;
- loss: ``loss(output, target) -> scalar tensor``, the batch's mean (as ``F.cross_entropy``).

Importing a module runs its code: name only modules you trust, as with any script you run.
Kept free of torch, so that the configuration that imports it stays cheap.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from hpc_asgd.errors import ConfigError

LOSSES = ("cross-entropy",)
_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def is_spec(value: str) -> bool:
    """Whether a ``--model`` / ``--dataset`` / ``--loss`` value names your own function."""
    return ":" in value


def check_spec(field: str, spec: str) -> None:
    """Its form, ``module.path:function``, without importing anything."""
    if not _SPEC.fullmatch(spec):
        raise ConfigError(
            f"{field}: {spec!r} is neither a built-in name nor module:function "
            "(a dotted module path, a colon, a function name)"
        )


def resolve(field: str, spec: str) -> Callable[..., Any]:
    """The callable that ``spec`` names; one-line errors for a module that does not import
    and a name that is missing or not callable."""
    check_spec(field, spec)
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # its own import errors too: a SyntaxError, a missing dependency
        raise ConfigError(
            f"{field}: cannot import {module!r} for {spec} ({type(e).__name__}: {e}); "
            "is its folder on PYTHONPATH?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: {module!r} has no {attr!r} ({spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}: {spec} is a {type(obj).__name__}, not a function")
    return obj


def call(field: str, spec: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with whatever it raises as one line naming the factory and its call."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as e:
        shown = ", ".join(map(repr, args))
        raise ConfigError(f"{field}: {spec}({shown}) raised {type(e).__name__}: {e}") from None


def loss_function(name: str) -> Callable[..., Any]:
    """``--loss``: ``cross-entropy`` is ``torch.nn.functional.cross_entropy``."""
    if name == "cross-entropy":
        import torch.nn.functional as F

        return F.cross_entropy
    return resolve("loss", name)
