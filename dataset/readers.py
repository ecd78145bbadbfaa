"""The registry of dataset readers: a reader name -> the class that lists and decodes its files. A ``--dataset`` of
one source is its reader's name; a cross-dataset task (``dataset.tasks.CROSS_DATASETS``) names several readers."""
from __future__ import annotations

from dataset.ade import ADEReader
from dataset.base import Reader
from dataset.cityscapes import CityscapesReader
from dataset.cityscapes_domain import CityscapesDomainReader
from dataset.coco import COCOReader, COCOStuff10kReader, VOCasCOCOReader
from dataset.tasks import dataset_names, label_space
from dataset.voc import VOCReader
from utils.errors import UserError

READERS: dict[str, type[Reader]] = {"voc": VOCReader, "ade": ADEReader, "cityscapes": CityscapesReader,
                                    "cityscapes_domain": CityscapesDomainReader, "coco": COCOReader,
                                    "voc_as_coco": VOCasCOCOReader, "coco_stuff_10k": COCOStuff10kReader}


def space_reader(dataset: str) -> type[Reader]:
    """The reader whose classes the models of ``--dataset`` predict (class count, names, palette)."""
    if dataset not in dataset_names():
        raise UserError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(dataset_names())} (fix --dataset)")
    return READERS[label_space(dataset)]
