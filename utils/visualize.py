"""Pictures of predictions: image | ground truth | prediction, coloured with the dataset palette."""
from __future__ import annotations

import numpy as np
import torch

from utils.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def index_to_class_lut(class_order: list[int]) -> np.ndarray:
    """Model output index -> original class id (so permuted class orders keep the dataset's colours)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[: len(class_order)] = class_order
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def panel(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, colorize, lut: np.ndarray) -> np.ndarray:
    """(H, 3W, 3) uint8: the image, its ground truth and the prediction side by side."""
    def colour(t):
        return colorize(lut[t.detach().cpu().numpy().astype(np.int64).clip(0, 255)])

    return np.concatenate([denormalize(image), colour(label), colour(pred)], axis=1)


class SampleCollector:
    """Keeps the first ``n`` panels of an evaluation pass (an ``evaluate`` sample hook)."""

    def __init__(self, n: int, colorize, lut: np.ndarray):
        self.n, self.colorize, self.lut = n, colorize, lut
        self.panels: list[np.ndarray] = []

    def __call__(self, batch_index: int, images, labels, pred) -> None:
        for b in range(images.shape[0]):
            if len(self.panels) >= self.n:
                return
            self.panels.append(panel(images[b], labels[b], pred[b], self.colorize, self.lut))
