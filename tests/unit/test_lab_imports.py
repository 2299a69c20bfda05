"""The lab's modules import each other without a cycle, imports for type checking included.

A cycle hidden behind ``if TYPE_CHECKING:`` still ties two modules together: neither can be
read, tested or moved without the other (lab.faults and lab.runner were such a pair).
"""

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parents[2] / "lab"


def lab_imports(path: Path, package: str = "lab") -> set[str]:
    """Every ``package.*`` module ``path`` imports, wherever the import statement sits."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == package:
            names.update(f"{package}.{alias.name}" for alias in node.names)  # from lab import topology
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name for name in names if name.startswith(package + ".")}


def import_graph(directory: Path, package: str = "lab") -> dict[str, set[str]]:
    modules = {f"{package}.{path.stem}": path for path in directory.glob("*.py") if path.stem != "__init__"}
    return {name: lab_imports(path, package) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            if cycle := visit(imported, [*path, module]):
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return None


def test_lab_modules_import_each_other_without_a_cycle() -> None:
    cycle = find_cycle(import_graph(LAB))
    assert cycle is None, "import cycle in lab/: " + " -> ".join(cycle or [])


def test_faults_does_not_import_the_runner() -> None:
    assert "lab.runner" not in lab_imports(LAB / "faults.py")


def test_a_cycle_behind_type_checking_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from lab.b import B\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lab import a\n")
    (tmp_path / "c.py").write_text("import lab.a\n")
    assert find_cycle(import_graph(tmp_path)) == ["lab.a", "lab.b", "lab.a"]
