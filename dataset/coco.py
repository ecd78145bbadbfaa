"""COCO 2017 with the COCO-Stuff pixel maps ("objects only", as WILSON uses them), VOC read in COCO's label space,
and COCO-Stuff-10K (171 classes, MaskFormer's preparation).

COCO layout (``--data_root`` = the ``coco`` folder or its parent; WILSON's layout)::

    images/{train2017,val2017}/*.jpg   annotations/{train2017,val2017}/*.png   split/{train,val}.txt (optional)

``annotations`` holds the COCO-Stuff maps as downloaded (``stuffthingmaps_trainval2017.zip``): value k in 0..90 is
the thing of COCO category k + 1, 91..181 are stuff, 255 unlabelled. The reader maps things to train ids 1..80 in
COCO's order, stuff to background 0, keeps 255, and sends the 11 category ids COCO never uses to 255 (map:
``dataset/maps/coco_things.csv``; ``python -m dataset.inspect coco`` prints it). A value 182..254 is refused with the
file and the value. ``split/*.txt`` lists image stems (WILSON ships them); without it, every image of the folder.

``voc_as_coco``: the VOC files (``PascalVOC12/`` or WILSON's ``voc/``) with labels mapped to COCO's train ids at load
time (``dataset/maps/voc_to_coco.csv``, WILSON's ``make_cocovoc.py``), instead of a relabelled copy on disk.

COCO-Stuff-10K (``--data_root`` = ``coco_stuff_10k`` or a parent holding it, or ``coco/coco_stuff_10k``)::

    images_detectron2/{train,test}/*.jpg   annotations_detectron2/{train,test}/*.png

ids 0..170 (80 things, then 91 stuff; there is no background class), 255 ignored; ``val`` reads ``test``.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from dataset.base import Reader, spread_palette
from dataset.labelmaps import (coco_class_names, coco_raw_lut, coco_stuff_171_names, coco_things, voc_to_coco,
                               voc_to_coco_lut)
from dataset.voc import VOCReader
from utils.errors import UserError

SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
_LUT, _VALID = coco_raw_lut()


def _child(root: str, names: tuple[str, ...], marker: str) -> str:
    """``root`` when it holds ``marker``, else its first child of ``names`` that does."""
    if os.path.isdir(os.path.join(root, marker)):
        return root
    for name in names:
        if os.path.isdir(os.path.join(root, name, marker)):
            return os.path.join(root, name)
    return root


class COCOReader(Reader):
    NAME = "coco"
    NUM_CLASSES = 81
    CLASS_NAMES = coco_class_names()
    PALETTE = spread_palette(81, seed=3)
    LABEL_LUT = np.array(_LUT, dtype=np.uint8)
    RAW_VALID = np.array(_VALID, dtype=bool)

    def _list(self) -> list[tuple[str, str]]:
        root = _child(self.root, ("coco",), "annotations")
        folder = SPLIT_FOLDERS[self.split]
        images, labels = (os.path.join(root, top, folder) for top in ("images", "annotations"))
        for path in (images, labels):
            if not os.path.isdir(path):
                raise UserError(f"COCO folder {path!r} does not exist; point --data_root to the coco folder (images/, "
                                f"annotations/ with the COCO-Stuff maps) or {self.hint(self.root)}")
        listing = os.path.join(root, "split", f"{self.split}.txt")
        if os.path.isfile(listing):
            with open(listing, encoding="utf-8", errors="replace") as handle:
                stems = [line.strip() for line in handle if line.strip()]
        else:
            stems = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(images, "*.jpg")))
        self.root = root
        return [(os.path.join(images, s + ".jpg"), os.path.join(labels, s + ".png")) for s in stems]


    @classmethod
    def label_map_lines(cls) -> list[str]:
        lines = ["COCO-Stuff pixel value -> COCO category id -> train id (name); 255 = ignored"]
        lines += [f"  {raw:3d} -> {cat:2d} -> " + (f"{train:2d} ({name})" if train != 255 else f"255 (unused id: {name})")
                  for raw, cat, train, name in coco_things()]
        return lines + ["   91..181 (stuff) -> 0 (background)", "  255 -> 255 (unlabelled, ignored)",
                        "  182..254 -> refused (not COCO-Stuff values)"]


class VOCasCOCOReader(VOCReader):
    """VOC images and labels, labels in COCO's train ids (for COCO-to-VOC)."""

    NAME = "voc_as_coco"
    NUM_CLASSES = 81
    CLASS_NAMES = coco_class_names()
    PALETTE = COCOReader.PALETTE
    LABEL_LUT = np.array(voc_to_coco_lut(), dtype=np.uint8)
    RAW_VALID = np.array([v <= 20 or v == 255 for v in range(256)], dtype=bool)
    AUX = ()

    def _list(self) -> list[tuple[str, str]]:
        self.root = _child(self.root, ("voc", "PascalVOC12"), "splits")
        return super()._list()

    @classmethod
    def label_map_lines(cls) -> list[str]:
        return ["VOC value -> COCO category id -> train id (VOC name -> COCO name); 255 = ignored"] + [
            f"  {voc:2d} -> {cat:2d} -> {int(cls.LABEL_LUT[voc]):2d} ({VOCReader.CLASS_NAMES[voc]} -> "
            f"{cls.CLASS_NAMES[int(cls.LABEL_LUT[voc])]})" for voc, cat in voc_to_coco().items()]

    @classmethod
    def hint(cls, root: str) -> str:
        return f"create the synthetic COCO-to-VOC data with: python -m dataset.synthetic {root} --layout coco-voc"


class COCOStuff10kReader(Reader):
    NAME = "coco_stuff_10k"
    NUM_CLASSES = 171
    CLASS_NAMES = coco_stuff_171_names()
    PALETTE = spread_palette(171, seed=4)
    LABEL_LUT = None
    SPLIT_FOLDERS = {"train": "train", "val": "test"}

    def _list(self) -> list[tuple[str, str]]:
        root = self.root
        for candidate in (root, os.path.join(root, "coco_stuff_10k"), os.path.join(root, "coco", "coco_stuff_10k")):
            if os.path.isdir(os.path.join(candidate, "images_detectron2")):
                root = candidate
                break
        sub = self.SPLIT_FOLDERS[self.split]
        images, labels = (os.path.join(root, top, sub) for top in ("images_detectron2", "annotations_detectron2"))
        for path in (images, labels):
            if not os.path.isdir(path):
                raise UserError(f"COCO-Stuff-10K folder {path!r} does not exist; point --data_root to the folder "
                                "MaskFormer's prepare_coco_stuff_10k_sem_seg.py wrote (images_detectron2/, "
                                f"annotations_detectron2/) or {self.hint(self.root)}")
        self.root = root
        return [(p, os.path.join(labels, os.path.splitext(os.path.basename(p))[0] + ".png"))
                for p in sorted(glob.glob(os.path.join(images, "*.jpg")))]
