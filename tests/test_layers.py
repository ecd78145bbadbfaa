"""Imports flow one way: every project file imports only its own layer or the layers below it, at the top of the
file, and no import cycle exists among the project files (docs/architecture.md, "Layers")."""
from __future__ import annotations

import ast
import os

import pytest

from conftest import ROOT

# Lowest first. A module belongs to the first layer with a matching top-level name.
LAYERS = [
    ("utils",),  # leaf: constants, errors, files, distributed helpers, pure loss functions
    ("modules",),  # network blocks
    ("models",),  # backbone families
    ("dataset",),  # readers, task tables, incremental wrapper, transforms, synthetic data
    ("metrics",),  # confusion matrix, result files, reports
    ("segmentation_module",),  # model assembly (ModelSpec, heads, classifiers)
    ("weaksup",),  # weakly-supervised segmentation parts: CAM network, masks, CSD, the wsss.py stages
    ("methods",),  # step plugins, loss terms, presets, AWT
    ("train",),  # the engine
    ("experiment",),  # command line, config, builders, validation
    ("run", "evaluate", "attribute", "attribute_class", "report", "average_csv", "wsss"),  # entry points
    ("benchmarks", "scripts"),  # tools around the product
]
SKIP_DIRS = {".git", ".venv", "tests", "__pycache__", ".pytest_cache", ".hypothesis", "data", "checkpoints",
             "results", "logs", "channels", "demo_out", "demo_ssul_out", "runs"}


def project_files() -> dict[str, str]:
    """module name -> path, for every .py file of the project outside tests/."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return out


MODULES = project_files()


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every import statement of a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_resolve(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [_resolve(f"{node.module}.{a.name}") for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) not in nested) for t in dict.fromkeys(targets) if t]
    return found


GRAPH = {m: imports_of(p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_and_sit_at_the_top(module):
    here = layer_of(module)
    for target, line, top in GRAPH[module]:
        assert top, f"{MODULES[module]}:{line} imports {target} inside a function: imports go at the top"
        assert layer_of(target) <= here, (f"{MODULES[module]}:{line}: {module} (layer {LAYERS[here]}) imports "
                                          f"{target} (layer {LAYERS[layer_of(target)]}), a layer above it")
        package = module.rpartition(".")[0]
        assert not (package and target == package and MODULES[module].endswith(".py")
                    and not MODULES[module].endswith("__init__.py")), (
            f"{MODULES[module]}:{line} imports its own package {package}: import the submodule instead "
            "(the package's __init__ imports its submodules, so this is a cycle)")


def test_no_import_cycle():
    edges = {m: sorted({t for t, _, _ in GRAPH[m] if t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_utils_is_a_leaf():
    """utils/ imports nothing of the project outside utils/ (anything may use it)."""
    for module in (m for m in MODULES if m.split(".")[0] == "utils"):
        outside = [t for t, _, _ in GRAPH[module] if t.split(".")[0] != "utils"]
        assert not outside, f"{module} imports {outside}"


def test_the_checker_sees_violations(tmp_path):
    """The parser behind the checks finds function-level and module-level project imports."""
    path = tmp_path / "probe.py"
    path.write_text("import os\nfrom utils.errors import UserError\n\ndef f():\n    from methods import awt\n")
    found = {(t, top) for t, _, top in imports_of(str(path))}
    assert found == {("utils.errors", True), ("methods.awt", False)}
