"""Joint image + label transforms (PIL in, uint8 tensors out), without torchvision, and the conversion of a loader
batch into the model's input on the device (normalisation there, not in the workers).

Every random draw uses the global torch RNG (``torch.rand`` / ``torch.randint``), so ``torch.manual_seed`` in the
main process plus the DataLoader's per-worker seeding make augmentation reproducible.
Images are resized bilinearly, labels with nearest neighbour (class ids are never blended).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from utils.constants import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError

Pair = tuple  # (image, label)


def _each(label, fn):
    """``label`` is one PIL map or a tuple ``(label, extra maps...)`` (e.g. a saliency map) transformed alike, with
    nearest-neighbour resampling."""
    return tuple(fn(m) for m in label) if isinstance(label, tuple) else fn(label)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


class RandomResizedCrop:
    """Crop a random area fraction ``scale`` and aspect ratio ``ratio`` of the image, resize it to ``size``.

    Same sampling as torchvision's RandomResizedCrop: 10 attempts to draw a crop that fits, else a centre crop
    clamped to ``ratio``. ``scale`` is an *area fraction*: with (0.5, 2.0) fractions above 1 never fit and fall back
    (as in the reference)."""

    def __init__(self, size: int | tuple[int, int], scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.scale = scale
        self.ratio = ratio

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, label: Image.Image):
        top, left, h, w = self.get_params(*image.size)
        box = (left, top, left + w, top + h)
        out = (self.size[1], self.size[0])
        # crop, then resize (torchvision's resized_crop); resize(box=...) samples differently at the crop border
        return (image.crop(box).resize(out, Image.BILINEAR),
                _each(label, lambda m: m.crop(box).resize(out, Image.NEAREST)))

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, label):
        if torch.rand(1).item() < self.p:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            return image.transpose(flip), _each(label, lambda m: m.transpose(flip))
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomScale:
    """Resize by a factor drawn uniformly from ``scale`` (SSUL's ExtRandomScale): size ``int(side * factor)``."""

    def __init__(self, scale=(0.5, 2.0)):
        self.scale = scale

    def __call__(self, image, label):
        factor = _uniform(*self.scale)
        w, h = image.size
        new = (int(w * factor), int(h * factor))
        return image.resize(new, Image.BILINEAR), _each(label, lambda m: m.resize(new, Image.NEAREST))

    def __repr__(self) -> str:
        return f"RandomScale({self.scale})"


def _pad_all_sides(image: Image.Image, pad: int, fill: int = 0) -> Image.Image:
    canvas = Image.new(image.mode, (image.width + 2 * pad, image.height + 2 * pad), fill)
    if image.mode == "P":
        canvas.putpalette(image.getpalette())
    canvas.paste(image, (pad, pad))
    return canvas


class PaddedRandomCrop:
    """A random ``size`` x ``size`` crop after padding a side shorter than ``size`` (SSUL's ExtRandomCrop with
    ``pad_if_needed``): a short width pads *every* side by ``(1 + size - width) // 2``, then a short height likewise,
    with 0 in the image, the label (background, not 255) and any extra map (saliency)."""

    def __init__(self, size: int, fill: int = 0):
        self.size = size
        self.fill = fill

    def __call__(self, image, label):
        for side in (0, 1):  # width, then height (of the image as padded so far)
            if image.size[side] < self.size:
                pad = (1 + self.size - image.size[side]) // 2
                image = _pad_all_sides(image, pad, self.fill)
                label = _each(label, lambda m, p=pad: _pad_all_sides(m, p, self.fill))
        w, h = image.size
        top = int(torch.randint(0, h - self.size + 1, (1,)).item())
        left = int(torch.randint(0, w - self.size + 1, (1,)).item())
        box = (left, top, left + self.size, top + self.size)
        return image.crop(box), _each(label, lambda m: m.crop(box))

    def __repr__(self) -> str:
        return f"PaddedRandomCrop({self.size}, fill={self.fill})"


class Resize:
    """Resize so that the short side is ``size`` (long side ``int(size * long / short)``, as torchvision)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, label):
        w, h = image.size
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        if new == (w, h):
            return image, label
        return image.resize(new, Image.BILINEAR), _each(label, lambda m: m.resize(new, Image.NEAREST))

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """Central ``size`` x ``size`` crop (the image must be at least that large: use after ``Resize``)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, label):
        w, h = image.size
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        box = (left, top, left + self.size, top + self.size)
        return image.crop(box), _each(label, lambda m: m.crop(box))

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class ToTensor:
    """PIL RGB -> uint8 (3, H, W); PIL label -> uint8 (H, W). No normalisation here: workers hand uint8 batches over
    (4x fewer bytes than float32 to pass between processes, pin and copy; 8x for int64 labels) and
    ``images_to_device`` normalises on the device."""

    def __call__(self, image, label):
        img = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return img, _each(label, lambda m: torch.from_numpy(np.asarray(m, dtype=np.uint8).copy()))

    def __repr__(self) -> str:
        return "ToTensor(uint8)"


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached per device: building them per batch would be a blocking host-to-device copy every iteration
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def images_to_device(images: torch.Tensor, device=None, *, channels_last: bool = False) -> torch.Tensor:
    """A loader batch as the model's input on ``device`` (None: where it is).

    uint8 (B, 3, H, W) pixels are copied as uint8 and normalised there with the ImageNet mean/std, with the
    reference's arithmetic (``x / 255``, then ``(x - mean) / std`` in float32); floating-point images are taken as
    already normalised (synthetic inputs of tests and benchmarks)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        mean, std = _mean_std(images.device)
        images = (images.float().div_(255.0) - mean) / std
    elif not images.is_floating_point():
        raise UserError(f"image batch of dtype {images.dtype}: a dataset must return uint8 pixels (3, H, W) or "
                        "float images already normalised")
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def labels_to_device(labels: torch.Tensor, device=None) -> torch.Tensor:
    """uint8 (or int64) (B, H, W) targets -> int64 on ``device`` (None: where they are); converted after the copy."""
    if device is not None:
        labels = labels.to(device, non_blocking=True)
    return labels.long()


def train_preset(crop_size: int) -> Compose:
    """RandomResizedCrop(crop_size, area fraction 0.5..2.0) + horizontal flip + ToTensor (normalised on the device)."""
    return Compose([RandomResizedCrop(crop_size, scale=(0.5, 2.0)), RandomHorizontalFlip(0.5), ToTensor()])


def ssul_train_preset(crop_size: int) -> Compose:
    """SSUL's training augmentation (clovaai/SSUL main.py L105-113): scale by 0.5..2, padded random crop (label and
    saliency padded with 0), horizontal flip, ToTensor."""
    return Compose([RandomScale((0.5, 2.0)), PaddedRandomCrop(crop_size, fill=0), RandomHorizontalFlip(0.5),
                    ToTensor()])


# --train_augment: the training transform of each published code base
TRAIN_PRESETS = {"reference": train_preset, "ssul": ssul_train_preset}


def eval_preset(crop_size: int, crop_val: bool = True) -> Compose:
    """``crop_val``: Resize(short side crop_size) + CenterCrop(crop_size); else the full image."""
    if crop_val:
        return Compose([Resize(crop_size), CenterCrop(crop_size), ToTensor()])
    return Compose([ToTensor()])
