"""The package's import graph: no cycles, and every import points down the floors of LAYOUT.md.

The graph is read from the source (``ast`` over ``codeformer_lightning/**/*.py``), so imports inside
functions, ``if`` blocks and ``TYPE_CHECKING`` count as much as those at the top: a lazy import that
goes upwards is still a dependency upwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "codeformer_lightning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: floor of each top-level part of the package (LAYOUT.md): a module may import its own floor and
#: the floors below, never a floor above. The package root (its __init__, the public facade that
#: re-exports from several floors) sits on top, so nothing inside the package may import it.
FLOORS = {
    "io": 1,
    "nn": 1,
    "data": 2,
    "losses": 2,
    "checkpoints": 2,
    "training": 2,
    "config_checks": 2,
    "models": 3,
    "inference": 3,
    "evaluation": 3,
    "train": 4,
    "pipeline": 4,
    "deploy": 4,
    "quickstart": 4,
    "commands": 5,
    "serve": 5,
    "": 6,  # codeformer_lightning/__init__.py
}
#: foundations: they import nothing of ours but themselves
SELF_CONTAINED = ("io", "nn")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Every module of the package (not the YAML-only conf tree) by dotted name."""
    return {
        module_name(p): p
        for p in sorted(ROOT.rglob("*.py"))
        if "conf" not in p.relative_to(ROOT).parts[:1] and "__pycache__" not in p.parts
    }


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that module ``name`` (``source``; ``is_package``: an ``__init__``) imports
    anywhere in its source, each resolved to the most specific module in ``modules``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            # "from .data import datasets" imports the module data.datasets; "from .data import X" data
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "codeformer_lightning.nn.blocks.X" -> the module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = source_files()
    names = set(files)
    return {
        name: imports_of(name, p.read_text(), p.name == "__init__.py", names) for name, p in files.items()
    }


def part(module: str) -> str:
    """``codeformer_lightning.data.datasets`` -> ``data``; the package root -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_sees_function_level_and_relative_imports():
    """The reader itself: a lazy relative import inside a function is an edge, 'from . import mod'
    names the module, and an attribute import resolves to its module."""
    modules = {
        "codeformer_lightning",
        "codeformer_lightning.a",
        "codeformer_lightning.a.b",
        "codeformer_lightning.c",
    }
    source = (
        "import os\n"
        "from . import b\n"
        "def f():\n"
        "    from ..c import thing\n"
        "    import codeformer_lightning.a.b.Name\n"
    )
    edges = imports_of("codeformer_lightning.a", source, True, modules)
    assert edges == {"codeformer_lightning.a.b", "codeformer_lightning.c"}
    plain = imports_of("codeformer_lightning.a.b", "from .. import c\nfrom . import Name\n", False, modules)
    assert plain == {"codeformer_lightning.c", "codeformer_lightning.a"}
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_every_part_of_the_package_has_a_floor(graph):
    unknown = sorted({part(m) for m in graph} - set(FLOORS))
    assert not unknown, f"add these parts of the package to FLOORS (LAYOUT.md): {unknown}"


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    details = [
        " -> ".join(c) + "\n    " + "\n    ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(details)


def test_no_cycles_between_parts_of_the_package(graph):
    """Collapsed to its parts (data, models, train, ...), the graph has no cycle either: a module-level
    acyclic graph can still tie two packages together (data.datamodule -> models.latent_codes ->
    data.datasets was one)."""
    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    assert not find_cycles(parts), f"cycles between parts of the package: {find_cycles(parts)}"


def test_imports_point_down_the_floors(graph):
    upward = [
        f"{module} (floor {FLOORS[part(module)]}) imports {target} (floor {FLOORS[part(target)]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if FLOORS[part(target)] > FLOORS[part(module)]
    ]
    assert not upward, "imports that point up (LAYOUT.md):\n" + "\n".join(upward)


@pytest.mark.parametrize("foundation", SELF_CONTAINED)
def test_foundations_import_nothing_of_ours_but_themselves(graph, foundation):
    outside = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if part(module) == foundation
        for target in targets
        if part(target) != foundation
    )
    assert not outside, "\n".join(outside)


def test_data_never_imports_models_inference_or_evaluation(graph):
    """Reading a latent-code file is data's job; computing codes needs the encoder (models)."""
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if part(module) == "data"
        for target in targets
        if part(target) in ("models", "inference", "evaluation", "train", "pipeline")
    )
    assert not bad, "\n".join(bad)


def test_train_does_not_know_the_pipeline(graph):
    assert f"{PACKAGE}.pipeline" not in graph[f"{PACKAGE}.train"]
    assert f"{PACKAGE}.train" in graph[f"{PACKAGE}.pipeline"]  # the pipeline runs train.train per stage
