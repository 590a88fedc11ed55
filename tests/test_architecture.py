"""The package's layering (docs/architecture.md): imports between pkmlm's parts point one way, downwards.

Each module belongs to a unit with a level; a module may import its own unit or a unit of a strictly lower
level. Two units on the same level (data, memory) may not import each other, so no cycle between units can
form. Parsed from the source (ast), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pkmlm"

# unit -> level. Shared helpers at the bottom; the command-line modules at the top.
LEVELS = {
    # cli: the command lines' shared error path (UserError, run); every error class derives from it.
    "fileio": 0, "progress": 0, "cli": 0,
    "precision": 1, "checkpoint": 1, "distributed": 1,
    "data": 2, "memory": 2,
    "config": 3,
    "models": 4,
    "eval": 5,
    "training": 6,
    "inspect": 7, "hf": 7,
}


def unit_of(module: str) -> str | None:
    """'pkmlm.memory.layer' -> 'memory'; None for a module outside pkmlm or the package root."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pkmlm" and len(parts) > 1 else None


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of a pkmlm module in ``path`` (a file under ``root``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if unit_of(base) is None else base) for a in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] == "pkmlm"]


def violations(root: Path = PKG) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        own = unit_of(".".join(rel.parts))
        if own is None or own == "__init__":  # pkmlm/__init__.py
            continue
        if own not in LEVELS:
            problems.append(f"{path.relative_to(root.parent)}: unit {own!r} has no level in LEVELS (add it here "
                            "and to docs/architecture.md)")
            continue
        for line, module in imports_of(path, root):
            target = unit_of(module)
            if target is None or target == own:
                continue
            if target not in LEVELS:
                problems.append(f"{path.relative_to(root.parent)}:{line}: imports {module}, a unit with no level")
            elif LEVELS[target] >= LEVELS[own]:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {own} (level {LEVELS[own]}) imports "
                                f"{module} ({target}, level {LEVELS[target]}): imports must point down")
    return problems


def test_imports_point_down():
    assert violations() == []


def test_the_check_catches_upward_and_sideways_imports(tmp_path):
    """A planted upward import (memory -> training) and a sideways one (data <-> memory) are both reported."""
    pkg = tmp_path / "pkmlm"
    for unit in ("memory", "data", "training"):
        (pkg / unit).mkdir(parents=True)
        (pkg / unit / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "memory" / "layer.py").write_text("def f():\n    from pkmlm.training.trainer import train\n")
    (pkg / "data" / "a.py").write_text("from pkmlm.memory import layer\n")
    (pkg / "training" / "trainer.py").write_text("from ..memory.layer import f\nfrom . import other\n")
    found = violations(pkg)
    assert len(found) == 2, found
    assert "memory/layer.py:2: memory (level 2) imports pkmlm.training.trainer" in found[1]
    assert "data/a.py:1: data (level 2) imports pkmlm.memory" in found[0]


@pytest.mark.parametrize("module", ["pkmlm.memory", "pkmlm.models", "pkmlm.eval", "pkmlm.training", "pkmlm.data"])
def test_every_unit_is_a_package_with_a_docstring(module):
    init = PKG / module.split(".")[1] / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring saying what the unit owns"
