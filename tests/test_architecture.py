"""The engine knows no method or dataset names: those live in methods/ (PRESETS, TERMS) and dataset/ (READERS)."""
from __future__ import annotations

import ast
import os

import pytest

from conftest import ROOT

ENGINE_FILES = ["train.py", "run.py", "segmentation_module.py", "evaluate.py", "experiment/builders.py",
                "utils/optim.py", "experiment/validate.py"]


def _names() -> set[str]:
    from dataset import READERS
    from methods import PRESETS

    return set(PRESETS) | set(READERS)


def _string_literals(tree: ast.AST):
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


@pytest.mark.parametrize("path", ENGINE_FILES)
def test_engine_files_contain_no_method_or_dataset_names(path):
    with open(os.path.join(ROOT, path)) as handle:
        tree = ast.parse(handle.read())
    names = _names()
    found = [(n.lineno, n.value) for n in _string_literals(tree) if n.value in names]
    assert not found, f"{path} names methods/datasets {found}: use the registries"
    compares = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and isinstance(node.left, ast.Attribute) and node.left.attr in ("method", "dataset")
                and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)]
    assert not compares, f"{path} branches on cfg.method/cfg.dataset at lines {compares}"


# The model's shared parts: everything under models/ and modules/ except the files a method keeps its own parts in.
METHOD_PART_FILES = {"modules/rcil.py", "modules/ssul.py", "modules/dropclass.py", "modules/wilson.py"}
MODEL_FILES = ["segmentation_module.py"] + sorted(
    f"{folder}/{name}" for folder in ("models", "modules") for name in os.listdir(os.path.join(ROOT, folder))
    if name.endswith(".py") and f"{folder}/{name}" not in METHOD_PART_FILES)


def _plugin_words() -> set[str]:
    """Method and extension names, lower case, split into words (``SSUL-M`` -> ssul, m), long enough to mean them."""
    from methods.registry import EXTENSIONS, METHODS

    words = {w for name in (*METHODS, *EXTENSIONS) for w in name.lower().replace("-", "_").split("_")}
    return {w for w in words if len(w) >= 3}


def _identifier_words(tree: ast.AST):
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.name, node.asname or ""]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        for name in names:
            for word in name.lower().replace(".", "_").split("_"):
                yield node.lineno if hasattr(node, "lineno") else 0, word


def test_model_file_list_is_the_shared_parts():
    assert "models/registry.py" in MODEL_FILES and "modules/heads.py" in MODEL_FILES
    assert not METHOD_PART_FILES & set(MODEL_FILES)


@pytest.mark.parametrize("path", MODEL_FILES)
def test_shared_model_files_know_no_method(path):
    """A method that changes the model registers its parts from its own file (modules/rcil.py, modules/ssul.py,
    modules/dropclass.py); the core model, the backbones and the shared modules never name it, in code or strings."""
    with open(os.path.join(ROOT, path)) as handle:
        tree = ast.parse(handle.read())
    words = _plugin_words()
    assert {"mib", "plop", "ssul", "rcil", "awt", "dropclass"} <= words
    found = [(line, word) for line, word in _identifier_words(tree) if word in words]
    found += [(n.lineno, n.value) for n in _string_literals(tree)
              if set(n.value.lower().replace("-", "_").replace(" ", "_").split("_")) & words]
    assert not found, f"{path} names methods {sorted(set(found))}: register the part from the method's own file"
