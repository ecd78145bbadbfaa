"""ADE20K (SceneParsing, ADEChallengeData2016) reader.

``root`` is either the ``ADEChallengeData2016`` folder or a folder containing it, relative or absolute::

    images/{training,validation}/*.jpg   annotations/{training,validation}/*.png

151 classes: 0 = void/other (used as background), 1..150 the scene-parsing classes.
"""
from __future__ import annotations

import glob
import os

from dataset.base import Reader, spread_palette
from utils.errors import UserError

CLASS_NAMES = (
    "void", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")

FOLDER = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}


def resolve_root(root: str) -> str:
    """The ``ADEChallengeData2016`` folder: ``root`` itself or its child of that name (absolute or relative)."""
    if os.path.isdir(os.path.join(root, FOLDER)):
        return os.path.join(root, FOLDER)
    return root


class ADEReader(Reader):
    NAME = "ade"
    NUM_CLASSES = 151
    CLASS_NAMES = CLASS_NAMES
    PALETTE = spread_palette(151, seed=1)
    LABEL_LUT = None

    def _list(self) -> list[tuple[str, str]]:
        root = resolve_root(self.root)
        sub = SPLIT_DIRS[self.split]
        images_dir = os.path.join(root, "images", sub)
        labels_dir = os.path.join(root, "annotations", sub)
        for folder in (images_dir, labels_dir):
            if not os.path.isdir(folder):
                raise UserError(f"ADE20K folder {folder!r} does not exist; point --data_root to "
                                f"{FOLDER} or its parent, or {self.hint(self.root)}")
        images = sorted(glob.glob(os.path.join(images_dir, "*.jpg")))
        self.root = root
        return [(p, os.path.join(labels_dir, os.path.splitext(os.path.basename(p))[0] + ".png")) for p in images]
