"""The import rules of docs/ARCHITECTURE.md, checked on the source: no cycle between modules or between
subpackages (imports inside functions included), and dependencies pointing one way between folders."""

from __future__ import annotations

import ast
import graphlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, from pyproject's package-dir mapping."""
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dirs.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _imported(node: ast.AST, module: str) -> list[str]:
    """The modules of ours an import statement loads (the deepest one that exists)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[: -node.level]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
        return []
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    return {module: {target for node in ast.walk(ast.parse(path.read_text())) for target in _imported(node, module)}
            for module, path in MODULES.items()}


def _layer(module: str) -> str:
    """The unit of the subpackage check: edgemri.core.data.sites -> edgemri.core.data; a core root module stays
    itself; any other module -> its top folder (edgemri.server.app -> edgemri.server)."""
    parts = module.split(".")
    if parts[:2] == ["edgemri", "core"]:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_the_graph_sees_every_folder_and_function_local_imports() -> None:
    graph = _graph()
    assert {"edgemri.core.config", "edgemri.core.data.splits", "edgemri.server.app", "edgemri.main"} <= set(graph)
    # cli/main.py imports the pipeline inside its command functions (lazily, for a fast --help)
    assert "edgemri.simulation.pipeline" in graph["edgemri.main"]


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_through_others() -> None:
    assert _cycle(_graph()) is None


def test_no_cycle_between_subpackages_or_folders() -> None:
    layers: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        layers.setdefault(_layer(module), set()).update(_layer(t) for t in targets if _layer(t) != _layer(module))
    assert _cycle(layers) is None


def test_config_is_a_leaf() -> None:
    assert _graph()["edgemri.core.config"] <= {"edgemri.core.errors", "edgemri.core.untrusted"}
    assert _graph()["edgemri.core.untrusted"] <= {"edgemri.core.errors"}


@pytest.mark.parametrize(("folder", "allowed"), [
    ("edgemri.models", ()),
    ("edgemri.core", ("edgemri.core", "edgemri.models")),
    ("edgemri.server", ("edgemri.server", "edgemri.core", "edgemri.models", "edgemri.reports")),
    ("edgemri.clients", ("edgemri.clients", "edgemri.core", "edgemri.models")),
    ("edgemri.reports", ("edgemri.reports", "edgemri.core", "edgemri.models")),
    ("edgemri.edge", ("edgemri.edge", "edgemri.core", "edgemri.models")),
])
def test_dependencies_point_one_way(folder: str, allowed: tuple[str, ...]) -> None:
    wrong = sorted(f"{module} -> {target}" for module, targets in _graph().items()
                   if module == folder or module.startswith(folder + ".")
                   for target in targets
                   if not any(target == a or target.startswith(a + ".") for a in allowed)
                   and not (folder == "edgemri.models" and target.startswith("edgemri.models")))
    assert wrong == []
