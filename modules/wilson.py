"""WILSON's parts that live next to the model (Cermelli et al., CVPR 2022; weak-steps.md 2.1-2.2): the localizer
that a weak step trains on the encoder features, and PAMR, the parameter-free refinement of its maps by local colour
affinities. Re-implemented from the paper and the facts of fcdl94/WILSON (tests compare with a transcription).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAMR_DILATIONS = (1, 2, 4, 8, 12)  # WILSON's train.py (the PAMR module's own default adds 24)
PAMR_ITERATIONS = 10
# WILSON's denorm has 0.4069 for the blue mean (a typo of 0.406), which its PAMR saw: kept for fidelity
WILSON_MEAN = (0.485, 0.456, 0.4069)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFSETS = tuple((dy, dx) for dy in (0, 1, 2) for dx in (0, 1, 2) if (dy, dx) != (1, 1))  # 8 neighbours, row-major


def build_localizer(in_channels: int, num_classes: int, norm_act: Callable[..., nn.Module]) -> nn.Sequential:
    """Conv3x3 (no bias) - norm - Conv3x3 (no bias) - norm - Conv1x1 to every class of the step (background, old,
    new), at the encoder's resolution; PyTorch's default initialisation, fresh at every weak step."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 256, 3, padding=1, bias=False)), ("norm1", norm_act(256)),
        ("conv2", nn.Conv2d(256, 256, 3, padding=1, bias=False)), ("norm2", norm_act(256)),
        ("classifier", nn.Conv2d(256, num_classes, 1))]))


def denormalize(images: torch.Tensor, mean: Sequence[float] = WILSON_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (B, 3, H, W) images back to [0, 1] colours (a new tensor)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * std_t + mean_t


def _shifted(x: torch.Tensor, dilation: int, centre: bool) -> list[torch.Tensor]:
    """The values of each pixel's 3x3 neighbours at ``dilation`` (replicate padding), row-major; with ``centre`` the
    pixel itself is included (9 maps), else not (8)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    offsets = [(dy, dx) for dy in (0, 1, 2) for dx in (0, 1, 2)] if centre else _OFFSETS
    return [padded[..., dy * dilation:dy * dilation + height, dx * dilation:dx * dilation + width]
            for dy, dx in offsets]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> torch.Tensor:
    """(B, 1, 8 * len(dilations), H, W): for each pixel the softmax over its neighbours of
    -|I_i - I_n| / (1e-8 + 0.1 sigma_i), averaged over the colour channels, where sigma_i is the unbiased standard
    deviation of the 9 x len(dilations) values around i (centre included)."""
    x = image.unsqueeze(2)  # (B, K, 1, H, W)
    neighbours = torch.cat([torch.stack(_shifted(image, d, centre=False), 2) for d in dilations], 2)
    window = torch.cat([torch.stack(_shifted(image, d, centre=True), 2) for d in dilations], 2)
    sigma = window.std(2, keepdim=True)
    logits = (-(x - neighbours).abs() / (1e-8 + 0.1 * sigma)).mean(1, keepdim=True)
    return logits.softmax(2)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = PAMR_ITERATIONS,
         dilations: Sequence[int] = PAMR_DILATIONS) -> torch.Tensor:
    """Pixel-adaptive mask refinement: ``masks`` (B, C, h, w), resized bilinearly (align_corners) to ``image``'s
    size (B, 3, H, W), then ``iterations`` times replaced at each pixel by the affinity-weighted mean of its
    neighbours' values (centre excluded). No parameter, no gradient needed: call it on detached maps."""
    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    affinity = pamr_affinity(image, dilations)
    for _ in range(iterations):
        neighbours = torch.cat([torch.stack(_shifted(masks, d, centre=False), 2) for d in dilations], 2)
        masks = (neighbours * affinity).sum(2)
    return masks
