"""Pascal VOC 2012 (+ SBD augmented labels) reader.

Layout of ``root`` (the ``PascalVOC12`` folder; a parent folder containing ``PascalVOC12/`` is accepted too)::

    JPEGImages/*.jpg  SegmentationClassAug/*.png  splits/train_aug.txt  splits/val.txt

Listing lines read ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` (leading slash stripped, relative to root).
Labels are single-channel PNGs (mode L or P) of class ids 0..20 with 255 on object boundaries.
"""
from __future__ import annotations

import os

from dataset.base import Reader, bit_palette
from utils.errors import UserError

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class VOCReader(Reader):
    NAME = "voc"
    NUM_CLASSES = 21
    CLASS_NAMES = CLASS_NAMES
    PALETTE = bit_palette(21)
    LABEL_LUT = None
    SPLIT_FILES = {"train": "splits/train_aug.txt", "val": "splits/val.txt"}
    AUX = ("saliency",)
    SALIENCY_URL = "https://github.com/clovaai/SSUL/releases/download/preparation/saliency_map.zip"

    def aux_path(self, name: str, index: int) -> str:
        if name != "saliency":
            return super().aux_path(name, index)
        stem = os.path.splitext(os.path.basename(self.samples[index][0]))[0]
        return os.path.join(self.root, "saliency_map", stem + ".png")

    def aux_missing_message(self, name: str, path: str) -> str:
        return (f"saliency map {path} does not exist: SSUL needs saliency_map/<image id>.png next to JPEGImages/ "
                f"for every training image (SSUL's maps: {self.SALIENCY_URL}; the synthetic generator writes them)")

    def _list(self) -> list[tuple[str, str]]:
        root = self.root
        if not os.path.isdir(os.path.join(root, "splits")) and os.path.isdir(os.path.join(root, "PascalVOC12")):
            root = os.path.join(root, "PascalVOC12")
        if not os.path.isdir(root):
            raise UserError(f"VOC root {root!r} does not exist; point --data_root to the PascalVOC12 folder or "
                            f"{self.hint(root)}")
        listing = os.path.join(root, self.SPLIT_FILES[self.split])
        if not os.path.isfile(listing):
            raise UserError(f"VOC split file {listing!r} does not exist; point --data_root to the PascalVOC12 "
                            f"folder (with splits/) or {self.hint(root)}")
        samples = []
        try:
            with open(listing, encoding="utf-8") as handle:
                lines = handle.readlines()
        except UnicodeDecodeError as exc:
            raise UserError(f"VOC split file {listing!r} is not UTF-8 text (byte {exc.start}): it must list "
                            "'image_path label_path' per line; restore or regenerate it") from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise UserError(f"{listing!r} line {number}: expected 'image_path label_path', got "
                                f"{line.strip()!r}; fix the listing")
            samples.append(tuple(os.path.join(root, f.lstrip("/")) for f in fields))
        self.root = root
        return samples
