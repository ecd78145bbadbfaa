"""Label maps kept as data (``dataset/maps/*.csv``): COCO's thing ids, COCO-Stuff-171's names, WILSON's VOC->COCO map.

Pure Python (no numpy, no torch), so that the task tables can use it.

* ``coco_things.csv``: for each COCO-Stuff pixel value 0..90 (a thing), its COCO category id (value + 1), the train id
  of this framework's COCO label space (1..80 in COCO's order; 255 for the 11 ids COCO never uses) and the name.
  Pixel values 91..181 are stuff (background, 0); 255 is unlabelled (ignored); 182..254 do not exist.
* ``coco_stuff_171.csv``: the 171 classes of COCO-Stuff-10K as MaskFormer's preparation writes them (ids 0..170,
  80 things then 91 stuff).
* ``voc_to_coco.csv``: each VOC class with the COCO category id it becomes (WILSON's ``data/make_cocovoc.py``).
"""
from __future__ import annotations

import csv
import os
from functools import lru_cache

MAPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maps")
IGNORE = 255
STUFF_VALUES = range(91, 182)  # COCO-Stuff pixel values of the stuff classes: background in the objects-only space


def _rows(name: str) -> list[dict[str, str]]:
    with open(os.path.join(MAPS, name), encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@lru_cache(maxsize=None)
def coco_things() -> tuple[tuple[int, int, int, str], ...]:
    """``(pixel value, category id, train id, name)`` of the 91 thing values of COCO-Stuff, in value order."""
    return tuple((int(r["raw_value"]), int(r["category_id"]), int(r["train_id"]), r["name"])
                 for r in _rows("coco_things.csv"))


@lru_cache(maxsize=None)
def coco_category_to_train() -> dict[int, int]:
    """COCO category id -> train id (1..80) for the 80 used ids; 0 (background) -> 0."""
    return {0: 0, **{cat: train for _, cat, train, _ in coco_things() if train != IGNORE}}


def coco_train_ids(category_ids) -> list[int]:
    """Train ids of a list of COCO category ids, order kept (a task list of WILSON's ``tasks.py`` -> this space)."""
    table = coco_category_to_train()
    bad = [c for c in category_ids if c not in table]
    if bad:
        raise ValueError(f"COCO category ids {bad} are not among COCO's 80 used ids")
    return [table[c] for c in category_ids]


@lru_cache(maxsize=None)
def coco_class_names() -> tuple[str, ...]:
    """The 81 names of the objects-only COCO label space: background, then the 80 things in COCO's order."""
    return ("background",) + tuple(name for _, _, train, name in coco_things() if train != IGNORE)


@lru_cache(maxsize=None)
def coco_raw_lut() -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``(lut, valid)``, 256 entries each: COCO-Stuff pixel value -> train id, and whether the value exists."""
    lut, valid = [IGNORE] * 256, [False] * 256
    for raw, _, train, _ in coco_things():
        lut[raw], valid[raw] = train, True
    for raw in STUFF_VALUES:
        lut[raw], valid[raw] = 0, True
    valid[IGNORE] = True
    return tuple(lut), tuple(valid)


@lru_cache(maxsize=None)
def voc_to_coco() -> dict[int, int]:
    """VOC class id -> COCO category id (WILSON's map; 0 -> 0)."""
    return {int(r["voc_id"]): int(r["coco_category_id"]) for r in _rows("voc_to_coco.csv")}


@lru_cache(maxsize=None)
def voc_to_coco_lut() -> tuple[int, ...]:
    """256 entries: VOC label value -> COCO train id; 255 stays 255, values VOC does not have -> 255 (the reader's
    validation refuses them before this LUT is applied)."""
    lut = [IGNORE] * 256
    for voc, cat in voc_to_coco().items():
        lut[voc] = coco_category_to_train()[cat]
    return tuple(lut)


@lru_cache(maxsize=None)
def coco_stuff_171_names() -> tuple[str, ...]:
    return tuple(r["name"] for r in _rows("coco_stuff_171.csv"))
