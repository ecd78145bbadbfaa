"""Cityscapes reader (class-incremental setting of AWT: 19 classes + background).

Layout of ``root``::

    leftImg8bit/{train,val}/{city}/{name}_leftImg8bit.png   gtFine/{train,val}/{city}/{name}_gtFine_labelIds.png

Labels hold the raw Cityscapes ids; ``LABEL_LUT`` maps them to train ids: 0 (unlabeled) -> 0 (background),
the 19 evaluation classes -> 1..19, every other id -> 255 (ignored).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from dataset.base import Reader, spread_palette
from utils.errors import UserError

CLASS_NAMES = ("background", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
               "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
               "motorcycle", "bicycle")

# raw label id -> train id (behaviour.md 4.4); ids not listed (1-6, 9, 10, 14-16, 18, 29, 30, 34..255) -> 255
RAW_TO_TRAIN = {0: 0, 7: 1, 8: 2, 11: 3, 12: 4, 13: 5, 17: 6, 19: 7, 20: 8, 21: 9, 22: 10, 23: 11, 24: 12, 25: 13,
                26: 14, 27: 15, 28: 16, 31: 17, 32: 18, 33: 19}


def _lut() -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for raw, train in RAW_TO_TRAIN.items():
        lut[raw] = train
    lut.setflags(write=False)
    return lut


class CityscapesReader(Reader):
    NAME = "cityscapes"
    NUM_CLASSES = 20
    CLASS_NAMES = CLASS_NAMES
    PALETTE = spread_palette(20, seed=2)
    LABEL_LUT = _lut()
    IMAGE_SUFFIX = "_leftImg8bit.png"
    LABEL_SUFFIX = "_gtFine_labelIds.png"

    def _list(self) -> list[tuple[str, str]]:
        images_dir = os.path.join(self.root, "leftImg8bit", self.split)
        labels_dir = os.path.join(self.root, "gtFine", self.split)
        for folder in (images_dir, labels_dir):
            if not os.path.isdir(folder):
                raise UserError(f"Cityscapes folder {folder!r} does not exist; point --data_root to the folder "
                                f"holding leftImg8bit/ and gtFine/, or {self.hint(self.root)}")
        images = sorted(glob.glob(os.path.join(images_dir, "*", "*" + self.IMAGE_SUFFIX)))
        samples = []
        for path in images:
            city = os.path.basename(os.path.dirname(path))
            stem = os.path.basename(path)[: -len(self.IMAGE_SUFFIX)]
            samples.append((path, os.path.join(labels_dir, city, stem + self.LABEL_SUFFIX)))
        return samples
