"""The architecture as a test: which package may import which (docs/design.md, "Layers"), and no import cycles.

Every import statement counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("operators", "restore", "baselines", "benchmarks", "training")

_ENGINE = {"operators", "restore.runtime", "restore.engine"}
_RESTORE = _ENGINE | {"restore.methods", "restore.quality", "restore.records", "restore.app", "restore.datasets",
                      "restore"}
# unit -> the units it may import (its own included)
ALLOWED = {
    "operators": {"operators"},
    "restore.runtime": {"operators", "restore.runtime"},
    "restore.engine": _ENGINE,
    "restore.quality": {"operators", "restore.runtime", "restore.quality"},
    "restore.records": _ENGINE | {"restore.records"},
    "restore.methods": _ENGINE | {"restore.methods"},
    "restore.app": _ENGINE | {"restore.methods", "restore.quality", "restore.records", "restore.app"},
    "restore.datasets": {"operators", "restore.runtime", "restore.app", "restore.datasets"},
    "restore": _ENGINE | {"restore"},
    "baselines": _ENGINE | {"restore.methods", "baselines"},
    "training": _RESTORE | {"baselines", "training"},
    "benchmarks": _RESTORE | {"benchmarks"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The longest key of ALLOWED that ``module`` is or lies under."""
    return max((u for u in ALLOWED if module == u or module.startswith(u + ".")), key=len)


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported anywhere in the file (``from a import b`` counts ``a.b`` when it is a module)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES and _exists(m)}


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): _imports(p, _module_name(p)) for p in files}


def test_packages_import_only_lower_layers():
    broken = [f"{m} imports {d}" for m, deps in sorted(_graph().items()) for d in sorted(deps)
              if _unit(d) not in ALLOWED[_unit(m)]]
    assert not broken, "layering broken:\n" + "\n".join(broken)


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its modules is not a cycle with them
    edges = {m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_see_imports():
    """The checker itself: it finds a known import, so an empty graph cannot pass the tests above."""
    graph = _graph()
    assert "restore.engine.wrappers" in graph["restore.engine.checkpoints"]
    assert _unit("restore.engine.networks.unet") == "restore.engine" and _unit("restore") == "restore"
