"""How the service's modules depend on each other: one way only."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"


def _module(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """The service modules ``path`` imports, wherever the import is."""
    tree = ast.parse(path.read_text())
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("service"):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            while name and not _exists(name):
                name = name.rpartition(".")[0]
            if name and name != _module(path):
                found.append(name)
    return found


def _exists(module: str) -> bool:
    path = SERVICE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_the_service_modules_import_each_other_one_way_only():
    """Every import counts, at module level, under TYPE_CHECKING or inside a function: an
    import moved into a function to dodge a circle still closes it here."""
    graph = {
        _module(path): {name for name in _imports(path) if name != "service"}
        for path in SERVICE.rglob("*.py")
        if path.name != "__init__.py" or path.parent != SERVICE  # the factory imports everything
    }
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"an import circle: {' -> '.join(error.args[1])}") from None
