"""The package's shape: sub-packages only at the top, no import cycle among fluxlab's modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fluxlab"


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ast.unparse(test) in (
        "TYPE_CHECKING",
        "typing.TYPE_CHECKING",
    )


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """fluxlab modules ``path`` imports anywhere (functions included), except under ``if
    TYPE_CHECKING``."""

    def owner(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxlab"):
            for alias in node.names:
                found.add(owner(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            found.update(owner(a.name) for a in node.names if a.name.startswith("fluxlab"))
        stack.extend(ast.iter_child_nodes(node))
    return found - {""}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_top_level_holds_only_init_and_cli() -> None:
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "cli.py"]


def test_no_import_cycle_among_fluxlab_modules() -> None:
    files = module_files()
    graph = {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_readme_python_example_imports_resolve() -> None:
    """The README's Python example names modules and functions that exist."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    imports = [line for line in block.splitlines() if line.startswith(("import ", "from "))]
    assert any("fluxlab" in line for line in imports)
    exec("\n".join(imports), {})  # raises ImportError if a name moved


def test_architecture_doc_names_every_sub_package_and_module() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent != PACKAGE:
            assert f"{init.parent.name}/" in doc, f"docs/architecture.md lacks {init.parent.name}/"
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            assert path.stem in doc, f"docs/architecture.md lacks {path.relative_to(PACKAGE)}"


def test_no_two_public_functions_or_classes_share_a_name() -> None:
    # commands/* all define add_parser and run: that is the subcommand interface, not a clash.
    owners: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" or path.parent.name == "commands":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                owners.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    shared = {name: files for name, files in owners.items() if len(files) > 1}
    assert not shared, shared
