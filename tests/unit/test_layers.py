"""Imports flow one way: no module of ours imports one that imports it back, and the domain imports no adapter.

Imports inside functions count too: a lazy import (as ``store/base.py``'s of its
own backends was) hides a circle from the interpreter, not from the design.
``from package import submodule`` depends on the submodule, not on the
package's ``__init__`` (a facade that may re-export it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("consumer", "statemachines")
# The domain is pure: no adapter, and no library that does I/O.
IO_LIBRARIES = ("aio_pika", "aiormq", "aiohttp", "asyncpg", "sqlite3", "socket", "consumer")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(node.module)
    return names


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Our modules and the modules of ours each one imports."""
    found = modules(root, packages)
    known = set(found)
    return {name: (imported(path, known) & known) - {name} for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = [stack.pop()]
            while group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert "consumer.store.base" in graph and "consumer.worker" in graph  # the walk found the tree
    assert circles(graph) == []


def test_the_store_base_knows_none_of_its_backends() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert graph["consumer.store.base"].isdisjoint(
        {"consumer.store.sqlite", "consumer.store.postgres", "consumer.store.opening"}
    )
    assert {"consumer.store.sqlite", "consumer.store.postgres"} >= graph["consumer.store.opening"] - {
        "consumer.store.base"
    }


def test_the_domain_imports_no_adapter_and_no_io() -> None:
    for name, path in modules(ROOT, ("statemachines",)).items():
        io = {module for module in imported(path, set()) if module.split(".")[0] in IO_LIBRARIES}
        assert io == set(), f"{name} imports {sorted(io)}"


def test_the_check_finds_a_lazy_import_circle(tmp_path: Path) -> None:
    """A base module opening its own backend inside a function, as ``store/base.py`` once did."""
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("def open_it():\n    from shop.backend import Backend\n    return Backend()\n")
    (package / "backend.py").write_text("from shop.base import open_it\n\nclass Backend: ...\n")
    (package / "other.py").write_text("from shop import base\n")
    assert circles(import_graph(tmp_path, ("shop",))) == [["shop.backend", "shop.base"]]
