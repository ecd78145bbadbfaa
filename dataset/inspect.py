"""Print what a dataset's readers do with the label files, for a user to check against their data:

    python -m dataset.inspect coco            # COCO-Stuff value -> COCO category id -> train id -> name
    python -m dataset.inspect coco-voc        # both sources of COCO-to-VOC, the VOC -> COCO map and the task's steps
    python -m dataset.inspect voc|ade|cityscapes|coco_stuff_10k

With ``--root PATH`` it also lists how many images each split of each source has there.
"""
from __future__ import annotations

import argparse
import sys

from dataset.readers import READERS, space_reader
from dataset.tasks import CROSS_DATASETS, TASKS, data_sources, dataset_names, get_task_labels
from utils.errors import UserError


def describe(dataset: str, root: str | None = None) -> str:
    if dataset not in dataset_names():
        raise UserError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(dataset_names())}")
    out = []
    for source, reader_name in data_sources(dataset).items():
        out.append(f"== source {source}: reader {reader_name} ({READERS[reader_name].NUM_CLASSES} classes)")
        out += READERS[reader_name].label_map_lines()
        if root is not None:
            for split in ("train", "val"):
                out.append(f"  {split}: {len(READERS[reader_name](root, split))} images under {root}")
    if dataset in CROSS_DATASETS:
        cross = CROSS_DATASETS[dataset]
        out.append("== steps: " + ", ".join(f"step {s} trains on {src}" for s, src in enumerate(cross.train))
                   + "; tests: " + ", ".join(f"{src} from step {first}" for src, first in cross.tests))
    names = space_reader(dataset).CLASS_NAMES
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
