"""Registries of the pluggable algorithms: synchronisers (``--algo``) and update rules
(``--update``). A new algorithm is one new file whose class is decorated with
``@SYNCHRONIZERS.register("name")`` (or ``UPDATE_RULES``); the configuration's choices, its
validation and the driver's construction all come from here.

A registry names the package of its built-in entries and imports it the first time it is
asked (plugin loading), so this module, and config.py which asks it, stay at the bottom of
the import order (errors, env, config -> comm, flat, optim, rules -> step -> sync -> workers
-> train -> cli).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class Registry:
    """Name -> class, filled by ``register`` decorators as the entries' modules are imported."""

    def __init__(self, field: str, builtins: str):
        self.field = field  # the configuration field that chooses an entry
        self.builtins = builtins  # the package whose import registers the built-in entries
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: ``name`` becomes a valid value of the field; ``cls.name = name``."""

        def add(cls: type) -> type:
            if self._entries.get(name, cls) is not cls:
                raise ValueError(f"{self.field} {name!r} is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._entries[name] = cls
            return cls

        return add

    def _load(self) -> None:
        importlib.import_module(self.builtins)

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-in ones first, in registration order."""
        self._load()
        return tuple(self._entries)

    def get(self, name: str) -> Any:
        self._load()
        return self._entries[name]

    def items(self) -> list[tuple[str, Any]]:
        self._load()
        return list(self._entries.items())


SYNCHRONIZERS = Registry("algo", "hpc_asgd.sync")
UPDATE_RULES = Registry("update", "hpc_asgd.rules")
