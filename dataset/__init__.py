"""Datasets: per-dataset readers, class-incremental task tables, the incremental wrapper, transforms."""
from dataset.ade import ADEReader
from dataset.base import Reader, load_pair
from dataset.cityscapes import CityscapesReader
from dataset.incremental import IncrementalSegmentation, build_datasets, build_step_datasets, filter_images
from dataset.readers import READERS
from dataset.tasks import TASKS, classes_per_step, get_task_labels, new_class_indices, num_steps, task_names
from dataset.voc import VOCReader

__all__ = ["READERS", "Reader", "VOCReader", "ADEReader", "CityscapesReader", "load_pair",
           "IncrementalSegmentation", "build_datasets", "build_step_datasets", "filter_images", "TASKS",
           "get_task_labels", "classes_per_step", "new_class_indices", "num_steps", "task_names"]
