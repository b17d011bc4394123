"""hf_r2's modules import one another one way only: no import cycle, not even through a function-level import."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_r2

PACKAGE_ROOT = Path(hf_r2.__file__).resolve().parent


def _module_name(path: Path, root: Path) -> str:
    parts = ["hf_r2", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def hf_r2_import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Every hf_r2 module -> the hf_r2 modules it imports anywhere in its body (top level or inside functions).

    `from package import name` points at `package.name` when that is a module, else at `package` itself (its
    `__init__`); relative imports are resolved against the importing module's package.
    """
    modules = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Returns one cycle (as a closed path of module names) per strongly connected component with more than one
    module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_sees_a_cycle_and_its_absence():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_resolves_relative_and_lazy_imports(tmp_path):
    package = tmp_path / "hf_r2"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import sub\n")
    (package / "sub" / "__init__.py").write_text("from .a import f\n")
    (package / "sub" / "a.py").write_text("def f():\n    from hf_r2.sub import b\n")
    (package / "sub" / "b.py").write_text("from ..sub.a import f\n")
    graph = hf_r2_import_graph(package)
    assert graph == {
        "hf_r2": {"hf_r2.sub"},
        "hf_r2.sub": {"hf_r2.sub.a"},
        "hf_r2.sub.a": {"hf_r2.sub.b"},
        "hf_r2.sub.b": {"hf_r2.sub.a"},
    }
    assert find_cycles(graph) == [["hf_r2.sub.a", "hf_r2.sub.b"]]


def test_hf_r2_has_no_import_cycle():
    cycles = find_cycles(hf_r2_import_graph())
    assert not cycles, f"import cycles inside hf_r2 (each a group of modules importing one another): {cycles}"
