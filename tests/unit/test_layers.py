"""Two layers, and within each, imports only point down.

The library (flat model, comm, rules, sync, step, workers, the public API in
``hpc_asgd/__init__.py``) takes plain arguments and never imports the application (config,
the model zoo, the datasets, the CLI's driver and loops, the tools): not at module level, not
inside a function, not for annotations. The application builds the library from a Config.
Within each layer, module-level imports point down the order below."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "hpc_asgd"

# Lower numbers sit lower; a module may import (at module level) only modules of a lower or
# equal layer (equal: within its own package).
LIBRARY = [
    ["errors", "registry", "signals", "worker_entry"],
    ["forkserver_guard"],
    ["env", "stats", "delays"],
    ["failure"],
    ["comm", "flat", "optim", "rules", "shard"],
    ["step"],
    ["sync"],
    ["workers"],
]
APPLICATION = [
    ["plugins", "board"],
    ["config"],
    ["data", "models", "metrics", "tools", "runlock"],
    ["evaluate", "checkpoint"],
    ["driver"],
    ["joiners"],
    ["elastic"],
    ["loops"],
    ["train"],
    ["cli"],
]
LAYERS = LIBRARY + APPLICATION
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
APP = {name for names in APPLICATION for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("hpc_asgd.") else module


def _targets(node: ast.AST) -> set[str]:
    """The hpc_asgd modules one import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "hpc_asgd":
            return {f"hpc_asgd.{a.name}" for a in node.names}
        if node.module.startswith("hpc_asgd."):
            return {node.module}
    elif isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("hpc_asgd.")}
    return set()


def _module_level(path: Path) -> set[str]:
    """hpc_asgd modules imported at module level (not inside functions or TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports: annotations only
            found |= _targets(node)
    return found


def _everywhere(path: Path) -> set[str]:
    """Every hpc_asgd module imported anywhere in the file: functions, TYPE_CHECKING too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        found |= _targets(node)
    return found


def _owner(path: Path) -> str:
    return path.stem if path.parent == PKG else path.relative_to(PKG).parts[0]


def test_every_module_is_placed_in_a_layer() -> None:
    mods = {_owner(p) for p in PKG.rglob("*.py")}
    assert mods - {"__init__", "__main__"} <= set(RANK), sorted(mods - set(RANK))


def test_imports_only_point_down() -> None:
    upward = []
    for path in PKG.rglob("*.py"):
        me = _owner(path)
        if me in ("__init__", "__main__"):
            continue
        for target in map(_top, _module_level(path)):
            if RANK[target] > RANK[me]:
                upward.append(f"{path.relative_to(PKG)} imports {target}")
    assert not upward, upward


def test_the_library_never_imports_the_application() -> None:
    """Function-local and TYPE_CHECKING imports included; the package's face (``__init__``)
    is the library's public API."""
    into_app = []
    for path in PKG.rglob("*.py"):
        me = _owner(path)
        if me in APP:
            continue
        for target in map(_top, _everywhere(path)):
            if target in APP:
                into_app.append(f"{path.relative_to(PKG)} imports {target}")
    assert not into_app, into_app


def test_the_check_finds_an_import_inside_a_function(tmp_path: Path) -> None:
    """The walk sees what a module-level scan would miss."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from hpc_asgd.config import Config\n"
        "def f():\n    from hpc_asgd.models import build_model\n    import hpc_asgd.data.base\n"
    )
    assert _module_level(src) == set()
    assert _everywhere(src) == {"hpc_asgd.config", "hpc_asgd.models", "hpc_asgd.data.base"}
