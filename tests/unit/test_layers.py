"""The package's layers only point down: no module imports (at module level) one above it.

errors, env, config -> comm, flat, optim, rules -> step -> sync -> workers -> train -> cli
(with data, models and the small leaf modules where their imports put them)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "hpc_asgd"

# Lower numbers sit lower; a module may import only modules of a lower or equal layer
# (equal: within its own package).
LAYERS = [
    ["errors", "registry", "signals", "worker_entry"],
    ["forkserver_guard"],
    ["env", "stats", "delays"],
    ["config", "failure"],
    ["comm", "flat", "optim", "rules", "data", "models", "metrics", "report", "predict"],
    ["step", "predict_cli"],
    ["sync", "checkpoint", "evaluate"],
    ["driver"],
    ["workers"],
    ["train"],
    ["cli"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("hpc_asgd.") else module


def _imports(path: Path) -> set[str]:
    """hpc_asgd modules imported at module level (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports are for annotations only
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "hpc_asgd":
                found |= {f"hpc_asgd.{a.name}" for a in node.names}
            elif node.module.startswith("hpc_asgd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hpc_asgd.")}
    return found


def test_every_module_is_placed_in_a_layer() -> None:
    mods = {p.stem if p.parent == PKG else p.parent.name for p in PKG.rglob("*.py")}
    assert mods - {"__init__", "__main__"} <= set(RANK), sorted(mods - set(RANK))


def test_imports_only_point_down() -> None:
    upward = []
    for path in PKG.rglob("*.py"):
        me = path.stem if path.parent == PKG else path.parent.name
        if me in ("__init__", "__main__"):
            continue
        for target in map(_top, _imports(path)):
            if RANK[target] > RANK[me]:
                upward.append(f"{path.relative_to(PKG)} imports {target}")
    assert not upward, upward
