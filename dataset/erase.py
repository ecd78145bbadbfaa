"""Erase one class from evaluation images (DropClass's supplementary Table B-1 protocol: how much does a model's
prediction of a class depend on the presence of the classes it co-occurs with?).

Each image that holds the class has the class's pixels filled from the rest of the image (onion-peel inpainting: the
hole is filled ring by ring from the inside edge, each pixel with the mean of its already-known 3x3 neighbours) and
their labels set to ignore; images without the class are left out. The control (``erase=False``) keeps the same
images and ignores the same pixels but leaves the image as it is, so that the two evaluations differ only in what
the model sees.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IGNORE = 255


def fill_from_surroundings(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``image`` (3, H, W) any dtype, ``hole`` (H, W) bool -> the image with the hole filled from its outside edge
    inwards (same dtype). An image that is all hole is returned unchanged."""
    if not hole.any() or hole.all():
        return image
    img = image.float()[None]
    known = (~hole).float()[None, None]
    img = img * known
    ones = torch.ones(1, 1, 3, 3)
    weights = torch.ones(img.shape[1], 1, 3, 3)
    while known.min() == 0:
        total = F.conv2d(img, weights, padding=1, groups=img.shape[1])
        count = F.conv2d(known, ones, padding=1)
        new = (known == 0) & (count > 0)
        img = torch.where(new, total / count.clamp(min=1), img)
        known = known + new.float()
    out = img[0]
    if image.dtype == torch.uint8:
        out = out.round().clamp(0, 255)
    return out.to(image.dtype)


class EraseClass(Dataset):
    """The items of ``dataset`` (``(image (3, H, W), label (H, W)[, ...])``) whose label holds ``cls``, with that
    class erased from the image and ignored in the label (``erase=False``: ignored in the label only, the control)."""

    def __init__(self, dataset: Dataset, cls: int, erase: bool = True):
        self.dataset, self.cls, self.erase = dataset, int(cls), bool(erase)
        self.indices = [i for i in range(len(dataset)) if bool((_label(dataset[i]) == self.cls).any())]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        item = self.dataset[self.indices[index]]
        image, label = item[0], _as_tensor(item[1])
        hole = label == self.cls
        if self.erase:
            image = fill_from_surroundings(image, hole)
        label = label.masked_fill(hole, IGNORE)
        return (image, label, *item[2:])


def _as_tensor(label) -> torch.Tensor:
    return label if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label))


def _label(item) -> torch.Tensor:
    return _as_tensor(item[1])
