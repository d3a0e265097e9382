"""The architecture's rules, checked on the import graph of ``pbe_lightning`` (every import,
including those inside functions): no circles, entry points independent, ``convert/`` below
the model, the demo outside production code."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from tests.helpers.config import REPO

PACKAGE = REPO / "pbe_lightning"
ENTRY_POINTS = ("train", "evaluate", "edit", "export")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module name an import in ``path`` may refer to (``from a import b`` -> a, a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path).split(".")
                package = package[: len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base]).rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@cache
def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_names(path) & set(modules) - {name} for name, path in modules.items()}


def reachable(start: str) -> set[str]:
    graph, seen, todo = import_graph(), set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_package_has_no_import_circle():
    circles = sorted(name for name in import_graph() if name in reachable(name))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_entry_point_imports_no_other_entry_point(entry):
    others = {f"pbe_lightning.{name}" for name in ENTRY_POINTS} - {f"pbe_lightning.{entry}"}
    assert not reachable(f"pbe_lightning.{entry}") & others


def test_convert_imports_neither_the_module_nor_its_builders_nor_an_entry_point():
    forbidden = {"pbe_lightning.models.module", "pbe_lightning.models.build"}
    forbidden |= {f"pbe_lightning.{name}" for name in ENTRY_POINTS}
    for name in import_graph():
        if name.startswith("pbe_lightning.convert"):
            assert not reachable(name) & forbidden, name


def test_production_code_never_imports_the_demo():
    for name in import_graph():
        if not name.startswith("pbe_lightning.demo"):
            demo = {m for m in reachable(name) if m.startswith("pbe_lightning.demo")}
            assert not demo, f"{name} imports {demo}"


@pytest.mark.parametrize("shim", ["train.py", "evaluate.py"])
def test_the_hydra_shims_import_only_the_library(shim):
    ours = {n for n in imported_names(REPO / shim) if n.split(".")[0] not in ("hydra", "omegaconf")}
    assert ours and all(n.startswith("pbe_lightning") or n == "sys" for n in ours), ours
