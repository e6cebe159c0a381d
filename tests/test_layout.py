"""The package's shape: no import circles, no long module without a reason, the tree as the
README shows it.

Read from the source with ``ast`` (nothing is imported), so a circle that only a lazy import
inside a function or a ``TYPE_CHECKING`` block closes is caught too: those work until someone
moves the import to the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlpipe"
MAX_LINES = 600
REASON = "Kept whole:"
"""A module over ``MAX_LINES`` says in its docstring, after this marker, why it is one idea."""

COMPONENTS = (
    "core",
    "run",
    "data",
    "log",
    "registry",
    "server",
    "inference",
    "serve",
    "monitor",
    "sweep",
)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import submodule` imports the submodule; `from mod import name`, mod
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def long_modules_without_reason(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    found = []
    for name, path in _modules(root).items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > limit and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            found.append(f"{name} ({lines} lines)")
    return found


def test_no_import_circles():
    assert import_circles(import_graph()) == []


def test_no_long_module_without_its_reason():
    assert long_modules_without_reason() == []


def test_core_imports_no_other_component():
    """core is what everything stands on: it may not reach up into a component."""
    graph = import_graph()
    upward = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith("mlpipe.core")
        for target in targets
        if target.split(".")[1] in COMPONENTS and not target.startswith("mlpipe.core")
    }
    assert upward == set()


def test_every_component_is_a_subpackage_with_a_docstring():
    for component in COMPONENTS:
        init = PACKAGE / component / "__init__.py"
        assert init.is_file(), component
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), component


def test_the_checks_find_a_circle_and_a_long_module(tmp_path):
    """The two checks above could pass by finding nothing at all: show that they find."""
    pkg = tmp_path / "mlpipe"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text('"""A."""\n')
    (pkg / "a" / "one.py").write_text("from mlpipe.a import two\n")
    (pkg / "a" / "two.py").write_text("def f():\n    from mlpipe.a.one import x\n")
    (pkg / "a" / "three.py").write_text("from mlpipe.a.one import y\n")
    (pkg / "long.py").write_text('"""Long."""\n' + "x = 1\n" * 20)
    (pkg / "reasoned.py").write_text(f'"""Long.\n\n{REASON} one idea.\n"""\n' + "x = 1\n" * 20)
    assert import_circles(import_graph(pkg)) == [["mlpipe.a.one", "mlpipe.a.two"]]
    assert long_modules_without_reason(pkg, limit=10) == ["mlpipe.long (21 lines)"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_readme_layout_names_every_component(component):
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    assert f"{component}/" in section
