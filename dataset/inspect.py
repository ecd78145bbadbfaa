"""Print what a dataset's readers do with the label files, for a user to check against their data:

    python -m dataset.inspect coco            # COCO-Stuff value -> COCO category id -> train id -> name
    python -m dataset.inspect coco-voc        # both sources of COCO-to-VOC, the VOC -> COCO map and the task's steps
    python -m dataset.inspect voc|ade|cityscapes|coco_stuff_10k

With ``--root PATH`` it also lists how many images each split of each source has there.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from dataset.labelmaps import coco_things, voc_to_coco
from dataset.readers import READERS
from dataset.tasks import CROSS_DATASETS, TASKS, data_sources, dataset_names, get_task_labels
from dataset.voc import CLASS_NAMES as VOC_NAMES
from utils.errors import UserError


def label_map_lines(reader_name: str) -> list[str]:
    """The reader's label-file value -> train id table (every value a file may hold)."""
    reader = READERS[reader_name]
    if reader_name == "coco":
        lines = ["COCO-Stuff pixel value -> COCO category id -> train id (name); 255 = ignored"]
        lines += [f"  {raw:3d} -> {cat:2d} -> " + (f"{train:2d} ({name})" if train != 255 else f"255 (unused id: {name})")
                  for raw, cat, train, name in coco_things()]
        lines += ["   91..181 (stuff) -> 0 (background)", "  255 -> 255 (unlabelled, ignored)",
                  "  182..254 -> refused (not COCO-Stuff values)"]
        return lines
    if reader_name == "voc_as_coco":
        names = reader.CLASS_NAMES
        lut = reader.LABEL_LUT
        return ["VOC value -> COCO category id -> train id (VOC name -> COCO name); 255 = ignored"] + [
            f"  {voc:2d} -> {cat:2d} -> {int(lut[voc]):2d} ({VOC_NAMES[voc]} -> {names[int(lut[voc])]})"
            for voc, cat in voc_to_coco().items()]
    if reader.LABEL_LUT is None:
        return [f"label values are the train ids 0..{reader.NUM_CLASSES - 1}; 255 = ignored"] + [
            f"  {i:3d} {name}" for i, name in enumerate(reader.CLASS_NAMES)]
    lut = np.asarray(reader.LABEL_LUT)
    return ["label value -> train id (name)"] + [
        f"  {raw:3d} -> {int(lut[raw]):3d} ({reader.CLASS_NAMES[int(lut[raw])] if lut[raw] != 255 else 'ignored'})"
        for raw in range(256) if lut[raw] != 255 or raw == 255]


def describe(dataset: str, root: str | None = None) -> str:
    if dataset not in dataset_names():
        raise UserError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(dataset_names())}")
    out = []
    for source, reader_name in data_sources(dataset).items():
        out.append(f"== source {source}: reader {reader_name} ({READERS[reader_name].NUM_CLASSES} classes)")
        out += label_map_lines(reader_name)
        if root is not None:
            for split in ("train", "val"):
                out.append(f"  {split}: {len(READERS[reader_name](root, split))} images under {root}")
    if dataset in CROSS_DATASETS:
        cross = CROSS_DATASETS[dataset]
        out.append("== steps: " + ", ".join(f"step {s} trains on {src}" for s, src in enumerate(cross.train))
                   + "; tests: " + ", ".join(f"{src} from step {first}" for src, first in cross.tests))
    names = READERS[data_sources(dataset)[next(iter(data_sources(dataset)))]].CLASS_NAMES
    if dataset in CROSS_DATASETS:
        names = READERS[CROSS_DATASETS[dataset].space].CLASS_NAMES
    for task, table in TASKS[dataset].items():
        out.append(f"== task {task}: " + "; ".join(
            f"step {s}: {len(get_task_labels(dataset, task, s)[0])} classes" for s in table))
        if len(table) <= 3:
            for s in table:
                out.append(f"  step {s}: " + ", ".join(f"{c} {names[c]}" for c in table[s]))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a --dataset name: " + ", ".join(dataset_names()))
    parser.add_argument("--root", default=None, help="also count the images of each split under this folder")
    args = parser.parse_args(argv)
    try:
        print(describe(args.dataset, args.root))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
