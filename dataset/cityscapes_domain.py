"""Cityscapes, domain-incremental (PLOP's ``cityscapes_domain``): the 19 evaluation classes at every step, new cities
at each step. Read from PLOP's ``dataset/cityscapes_domain.py`` (4b4a060), which is the specification:

* images: every ``leftImg8bit/{train,val}/{city}/*.png`` (train cities first, each folder sorted), one city id each
  (``CITY_IDS``: 18 train and 3 val cities, 21 domains);
* labels: raw Cityscapes ids mapped to train ids 0 (road) ... 18 (bicycle), every other id to 255 (no background);
* a step's images: those of its cities (task table ``cityscapes_domain``), shuffled with ``RandomState(1)``; training
  takes the first 80 %, validation and test the rest. The test set of step t draws from the cities of steps 0..t,
  shuffled anew, so its 20 % may hold images an earlier step trained on, as in the reference.
"""
from __future__ import annotations

import glob
import os

import numpy as np
from torch.utils.data import Dataset

from dataset.base import Reader, spread_palette
from dataset.cityscapes import RAW_TO_TRAIN
from utils.errors import UserError

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITY_IDS = {"aachen": 0, "bremen": 1, "darmstadt": 2, "erfurt": 3, "hanover": 4, "krefeld": 5, "strasbourg": 6,
            "tubingen": 7, "weimar": 8, "bochum": 9, "cologne": 10, "dusseldorf": 11, "hamburg": 12, "jena": 13,
            "monchengladbach": 14, "stuttgart": 15, "ulm": 16, "zurich": 17, "frankfurt": 18, "lindau": 19,
            "munster": 20}
TRAIN_FRACTION = 0.8  # reference: int(0.8 * len(idxs)) images train, the rest validation/test
SHUFFLE_SEED = 1


def _lut() -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for raw, train in RAW_TO_TRAIN.items():
        if train > 0:  # the class-incremental reader's background (raw 0) is ignored here
            lut[raw] = train - 1
    lut.setflags(write=False)
    return lut


class CityscapesDomainReader(Reader):
    """Every image of the train and val folders (whatever ``split``), with its city id in ``cities``."""

    NAME = "cityscapes_domain"
    NUM_CLASSES = 19
    CLASS_NAMES = CLASS_NAMES
    PALETTE = spread_palette(19, seed=3)
    LABEL_LUT = _lut()
    DOMAIN_INCREMENTAL = True

    def _list(self) -> list[tuple[str, str]]:
        samples, cities = [], []
        for split in ("train", "val"):
            images_dir = os.path.join(self.root, "leftImg8bit", split)
            if not os.path.isdir(images_dir):
                raise UserError(f"Cityscapes folder {images_dir!r} does not exist; point --data_root to the folder "
                                f"holding leftImg8bit/ and gtFine/, or {self.hint(self.root)}")
            for path in sorted(glob.glob(os.path.join(images_dir, "*", "*_leftImg8bit.png"))):
                city = os.path.basename(os.path.dirname(path))
                if city not in CITY_IDS:
                    raise UserError(f"Cityscapes image {path!r} is in an unknown city folder {city!r}; the domain "
                                    f"protocol knows {', '.join(CITY_IDS)}")
                stem = os.path.basename(path)[: -len("_leftImg8bit.png")]
                samples.append((path, os.path.join(self.root, "gtFine", split, city, stem + "_gtFine_labelIds.png")))
                cities.append(CITY_IDS[city])
        self.cities = np.asarray(cities, dtype=np.int64)
        return samples

    @classmethod
    def hint(cls, root: str) -> str:
        return f"create the synthetic dataset with: python -m dataset.synthetic {root} --layout cityscapes"


def city_indices(reader: CityscapesDomainReader, cities) -> np.ndarray:
    """The reader indices of the images of ``cities``, in listing order (before the reference's shuffle)."""
    return np.flatnonzero(np.isin(reader.cities, list(cities))).astype(np.int64)


class DomainIncremental(Dataset):
    """The images of some cities: the first 80 % of their ``RandomState(1)`` shuffle (``train``) or the rest.

    Items: ``(image uint8 (3, H, W), label uint8 (H, W))`` with train ids 0..18 and 255. ``idxs``: the filtered
    (unshuffled) indices of the cities when the caller has them (the index cache), else computed here."""

    def __init__(self, reader: CityscapesDomainReader, *, cities, train: bool, transform, idxs=None,
                 description: str = ""):
        self.reader, self.transform = reader, transform
        self.description = description or f"{reader.NAME} cities {list(cities)}"
        idxs = city_indices(reader, cities) if idxs is None else np.asarray(idxs, dtype=np.int64)
        order = idxs.tolist()
        np.random.RandomState(SHUFFLE_SEED).shuffle(order)
        cut = int(TRAIN_FRACTION * len(order))
        self.idxs = np.asarray(order[:cut] if train else order[cut:], dtype=np.int64)
        if len(self.idxs) == 0:
            raise UserError(f"no image for {self.description}; use a larger dataset or another task/step")

    def __len__(self) -> int:
        return len(self.idxs)

    def __getitem__(self, index: int):
        image, label = self.reader.load(int(self.idxs[index]))
        return self.transform(image, label)

    def sample_path(self, index: int) -> tuple[str, str]:
        return self.reader.samples[int(self.idxs[index])]
