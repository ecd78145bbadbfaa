"""The registry of dataset readers: ``--dataset NAME`` -> the class that lists and decodes its files."""
from __future__ import annotations

from dataset.ade import ADEReader
from dataset.base import Reader
from dataset.cityscapes import CityscapesReader
from dataset.cityscapes_domain import CityscapesDomainReader
from dataset.voc import VOCReader

READERS: dict[str, type[Reader]] = {"voc": VOCReader, "ade": ADEReader, "cityscapes": CityscapesReader,
                                    "cityscapes_domain": CityscapesDomainReader}
