"""The package layout stays layered: every qformer import (module level or inside a function) points down
the layer order, and no set of modules imports itself round in a cycle.

Layers, bottom first; a module may import its own package and the packages of lower layers only:

    core < config < models < data < features < evaluate, tracking < train < jobs < bench < commands < cli

`evaluate` and `tracking` share a layer and import neither each other. The imports are read with `ast`,
so an import hidden in a function body counts as much as one at the top of the file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qformer"
LAYERS: list[tuple[str, ...]] = [
    ("core",), ("config",), ("models",), ("data",), ("features",), ("evaluate", "tracking"), ("train",),
    ("jobs",), ("bench",), ("commands",), ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def qformer_imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(imported qformer module, line) for every import statement in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "qformer"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "qformer":
                continue
            for alias in node.names:  # `from qformer.x import y` may name the module qformer.x.y
                sub = f"{base}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (root.parent / Path(*sub.split("."))).is_dir()
                found.append((sub if is_module else base, node.lineno))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # `qformer` itself: the package's version only


def upward_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        mine = layer_of(source)
        if mine is None:
            continue
        assert mine in RANK, f"{source}: package '{mine}' has no place in LAYERS; add it where it belongs"
        for target, line in qformer_imports(path, root):
            theirs = layer_of(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in RANK or RANK[theirs] >= RANK[mine]:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {source} (layer {mine}) imports "
                                f"{target} (layer {theirs}), which is not below it")
    return problems


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Cycles in the module graph (Tarjan's strongly connected components of two or more modules)."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        source = module_name(path, root)
        graph.setdefault(source, set()).update(t for t, _ in qformer_imports(path, root) if t != source)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
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
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_import_points_down_the_layers():
    problems = upward_imports()
    assert not problems, "imports that point up (or sideways) the layer order:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


@pytest.mark.parametrize("planted, expect", [
    ("from qformer.train.step import train_step\n", "imports qformer.train.step (layer train)"),
    ("def f():\n    from qformer.jobs import train_job\n", "imports qformer.jobs.train_job (layer jobs)"),
])
def test_the_check_catches_a_planted_upward_import(tmp_path, planted, expect):
    """A copy of the package with one upward import added to a model module fails the check."""
    import shutil

    copy = tmp_path / "qformer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert upward_imports(copy) == []
    target = copy / "models" / "losses.py"
    target.write_text(target.read_text() + "\n" + planted)
    problems = upward_imports(copy)
    assert len(problems) == 1 and expect in problems[0] and "models/losses.py" in problems[0], problems


def test_the_check_catches_a_planted_cycle(tmp_path):
    import shutil

    copy = tmp_path / "qformer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert import_cycles(copy) == []
    (copy / "core" / "a_mod.py").write_text("from qformer.core import b_mod\n")
    (copy / "core" / "b_mod.py").write_text("def f():\n    import qformer.core.a_mod\n")
    assert import_cycles(copy) == [["qformer.core.a_mod", "qformer.core.b_mod"]]
