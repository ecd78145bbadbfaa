"""Weak-shot segmentation splits (SimFormer, NeurIPS 2022; simformer.md section 1), as data.

A weak-shot task is one training step over every class of the dataset in which the **novel** classes have image-level
labels only: their pixels are hidden (255) in the training labels and each training item lists the novel classes
still present after augmentation (SimFormer's mapper reads them from the augmented crop). The test covers every class;
the report gives base, novel and all mIoU, novel being SimFormer's headline number.

The novel lists are ``dataset/maps/weak_shot_splits.csv``, in the ids of SimFormer's files (bcmi/SimFormer,
``prop_former/data/datasets/{coco_stuff_10k/meta_files,ADE_20k}/info.py``): COCO-Stuff-10K splits 1-3 are fixed lists,
split 4 the first round(171 / 4) = 43 ids of its permutation ``randp`` and splits 5-9 its first int(171 r) ids for
r = 0.30, 0.35, 0.40, 0.45, 0.50; ADE20K-150 has four fixed lists in MaskFormer's ids 0..149, which are this
framework's ADE labels 1..150 (label 0, "other", is ignored as in MaskFormer). ``voc`` ``ws15-5`` (novel = the classes
of VOC 15-5's second step) is this framework's own, for small experiments; no paper uses it.

Pure Python: the task tables import it.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache

SPLITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maps", "weak_shot_splits.csv")
COCO_STUFF_RATIOS = (0.30, 0.35, 0.40, 0.45, 0.50)  # SimFormer's splits 5-9 (its Table 3: more novel classes)


@dataclass(frozen=True)
class WeakShotSplit:
    """``novel``: label ids (this framework's reader) that have image labels only; ``ignored``: label ids read as
    255 everywhere (train and test); every other class of the dataset is a base class with pixel labels."""

    novel: tuple[int, ...]
    num_classes: int
    ignored: tuple[int, ...] = ()

    @property
    def base(self) -> tuple[int, ...]:
        hidden = set(self.novel) | set(self.ignored)
        return tuple(c for c in range(self.num_classes) if c not in hidden)


def _source_lists() -> dict[tuple[str, str], list[int]]:
    with open(SPLITS_FILE, newline="") as f:
        return {(row["dataset"], row["split"]): [int(x) for x in row["novel_source_ids"].split()]
                for row in csv.DictReader(f)}


@lru_cache(maxsize=None)
def weak_shot_splits() -> dict[str, dict[str, WeakShotSplit]]:
    """``{dataset: {task name: split}}``."""
    lists = _source_lists()
    randp = lists[("coco_stuff_10k", "randp")]
    coco = {f"ws{k}": lists[("coco_stuff_10k", str(k))] for k in (1, 2, 3)}
    coco["ws4"] = randp[:round(171 / 4)]
    coco.update({f"ws{5 + i}": randp[:int(171 * r)] for i, r in enumerate(COCO_STUFF_RATIOS)})
    out = {"coco_stuff_10k": {name: WeakShotSplit(tuple(sorted(ids)), 171) for name, ids in coco.items()},
           "ade": {f"ws{k}": WeakShotSplit(tuple(sorted(i + 1 for i in lists[("ade", str(k))])), 151, ignored=(0,))
                   for k in (1, 2, 3, 4)},
           "voc": {"ws15-5": WeakShotSplit(tuple(range(16, 21)), 21)}}
    return out


def weak_shot_split(dataset: str, task: str) -> WeakShotSplit | None:
    """The split of a weak-shot task; None for every other task."""
    return weak_shot_splits().get(dataset, {}).get(task)
