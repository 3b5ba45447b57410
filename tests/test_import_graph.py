"""The package's import graph, read from the source (deferred imports inside functions included): no cycle between
modules or between units (subpackages), actor classes imported only by the orchestration layer, process utilities
below everything, and nothing named ``actors`` importable on its own."""
from __future__ import annotations

import ast
import importlib.machinery
import sys
from pathlib import Path

from tests.conftest import ROOT

ACTOR_CLASSES = {f"rlhf_ray.actors.{name}" for name in ("generation", "learner", "reference", "reward")}
ORCHESTRATION = ("rlhf_ray.cluster", "rlhf_ray.drivers", "rlhf_ray.cli", "rlhf_ray.actors")


def module_files() -> dict[str, Path]:
    """Module name -> file, for rlhf_ray/ and for actors/ as it is imported (rlhf_ray.actors)."""
    files = {}
    for package, directory in (("rlhf_ray", ROOT / "rlhf_ray"), ("rlhf_ray.actors", ROOT / "actors")):
        for path in directory.rglob("*.py"):
            parts = path.relative_to(directory).with_suffix("").parts
            name = ".".join((package, *parts))
            files[name.removesuffix(".__init__")] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its source."""
    files = module_files()

    def known(name: str) -> str:
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in files.items():
        imported = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {known(alias.name) for alias in node.names if alias.name.split(".")[0] == "rlhf_ray"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "rlhf_ray":
                    continue
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    imported.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else known(base))
        graph[name] = imported - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in list(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def unit_of(module: str) -> str:
    """rlhf_ray.<subpackage> for modules in a subpackage, the module itself at the top level."""
    return ".".join(module.split(".")[:2]) if module != "rlhf_ray" else module


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_no_two_units_import_each_other():
    units: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        units.setdefault(unit_of(module), set()).update(unit_of(m) for m in imported if unit_of(m) != unit_of(module))
    assert cycles(units) == []


def test_only_the_orchestration_layer_imports_actor_classes():
    top_level_entry_points = {m for m in module_files() if m.count(".") == 1 and not module_files()[m].name == "__init__.py"}
    offenders = {module: sorted(imported & ACTOR_CLASSES) for module, imported in import_graph().items()
                 if imported & ACTOR_CLASSES and not module.startswith(ORCHESTRATION)
                 and module not in top_level_entry_points}
    assert offenders == {}


def test_process_utilities_import_nothing_of_the_project_but_each_other():
    graph = import_graph()
    outside = {m: sorted(i for i in graph[m] if not i.startswith("rlhf_ray.runtime"))
               for m in graph if m.startswith("rlhf_ray.runtime")}
    assert {m: imported for m, imported in outside.items() if imported} == {}


def test_the_role_classes_import_as_rlhf_ray_actors_and_nothing_named_actors_is_importable_outside_the_repo():
    import rlhf_ray.actors.role as role

    assert Path(role.__file__).resolve() == ROOT / "actors" / "role.py"
    outside = [p for p in sys.path if Path(p or ".").resolve() != ROOT]  # pytest puts the repository on sys.path
    for finder in sys.meta_path:  # the installed package's own finder (an editable install maps names) included
        if isinstance(finder, type) and issubclass(finder, importlib.machinery.PathFinder):
            assert finder.find_spec("actors", outside) is None
        elif hasattr(finder, "find_spec"):
            assert finder.find_spec("actors", None) is None, finder


def test_the_graph_reader_sees_deferred_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "rlhf_ray.actors.learner" in graph["rlhf_ray.cluster.roles"] or any(
        "rlhf_ray.actors.learner" in graph[m] for m in graph if m.startswith("rlhf_ray.cluster"))
    assert cycles({**graph, "rlhf_ray.runtime.memory": {"rlhf_ray.run.console"},
                   "rlhf_ray.run.console": {"rlhf_ray.runtime.memory"}}) != []
