"""Imports flow one way, benchmarks -> export -> runtime, and export has no import cycles: read
from every import statement in the source, deferred ones inside functions included."""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("runtime", "export", "benchmarks")


def imports(path: Path) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import x` may be a module
    return found


def modules(package: str) -> dict[str, set[str]]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): imports(p) for p in (ROOT / package).rglob("*.py")}


def test_runtime_imports_neither_export_nor_benchmarks():
    for name, found in modules("runtime").items():
        assert not {m for m in found if m.split(".")[0] in ("export", "benchmarks")}, name


def test_export_imports_nothing_from_benchmarks():
    for name, found in modules("export").items():
        assert not {m for m in found if m.split(".")[0] == "benchmarks"}, name


def test_export_modules_form_no_cycle():
    export = modules("export")
    graph = {name: {m for m in found if m in export and m != name and not m.endswith("__init__")}
             for name, found in export.items()}
    visiting, done = set(), set()

    def visit(node, path):
        assert node not in visiting, " -> ".join([*path, node])
        if node in done:
            return
        visiting.add(node)
        for dep in graph[node]:
            visit(dep, [*path, node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])
