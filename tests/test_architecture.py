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
