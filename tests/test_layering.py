"""The package layout keeps its rules (docs/architecture.md): read from the source, not imported.

Every module's imports are read with ``ast`` (module level and inside
functions alike, an ``if TYPE_CHECKING:`` block apart), so a rule broken by a
late import in one function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import convd

ROOT = Path(convd.__file__).parent
DAEMON = ("convd.config", "convd.pipeline", "convd.stages", "convd.app", "convd.monitor", "convd.cancel",
          "convd.cancel_requests", "convd.resolved", "convd.convert", "convd.cli")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, *, runtime_only: bool = True) -> set[str]:
    """The convd modules ``path`` imports (``from convd import x`` counts as ``convd.x``)."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    here = _module(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("convd")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if not base.startswith("convd"):
                continue
            for a in node.names:
                candidate = f"{base}.{a.name}"
                found.add(candidate if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (ROOT.parent / candidate.replace(".", "/") / "__init__.py").exists() else base)
    return found


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(ROOT.rglob("*.py"))}


def _breaks(imported: str, rules: tuple[str, ...]) -> bool:
    return any(imported == r or imported.startswith(r + ".") for r in rules)


def test_image_package_imports_nothing_of_the_daemon():
    offenders = {name: sorted(i for i in _imports(path, runtime_only=False) if _breaks(i, DAEMON))
                 for name, path in _modules().items() if name.startswith("convd.image")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_qemu_package_imports_nothing_of_the_daemon_at_run_time():
    # convd.qemu.img names convd.config's dataclasses in annotations only.
    offenders = {name: sorted(i for i in _imports(path) if _breaks(i, DAEMON))
                 for name, path in _modules().items() if name.startswith("convd.qemu")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_convd_has_no_import_cycle():
    modules = _modules()
    graph = {name: {i for i in _imports(path) if i in modules and i != name} for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m):], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert [" -> ".join(c) for c in cycles] == []


def test_container_kinds_are_the_ones_the_config_accepts():
    from convd.config import CONTAINER_KINDS
    from convd.image.containers import KINDS

    assert KINDS == CONTAINER_KINDS
