"""Datasets: per-dataset readers, class-incremental task tables, the incremental wrapper, transforms.

The names below load their submodule on first use, so ``import dataset.tasks`` (the scripts' fast paths) does not
import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "READERS": "dataset.readers", "Reader": "dataset.base", "load_pair": "dataset.base",
    "VOCReader": "dataset.voc", "ADEReader": "dataset.ade", "CityscapesReader": "dataset.cityscapes",
    "CityscapesDomainReader": "dataset.cityscapes_domain",
    "IncrementalSegmentation": "dataset.incremental", "build_datasets": "dataset.incremental",
    "build_step_datasets": "dataset.incremental", "filter_images": "dataset.incremental",
    "TASKS": "dataset.tasks", "get_task_labels": "dataset.tasks", "classes_per_step": "dataset.tasks",
    "new_class_indices": "dataset.tasks", "num_steps": "dataset.tasks", "task_names": "dataset.tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
