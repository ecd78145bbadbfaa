"""Small building blocks shared by the backbone and the head."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def try_index(value, index: int):
    """``value[index]`` for sequences, ``value`` itself for scalars (per-axis or shared settings)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value[index]
    return value


def pick(features, name: str | None) -> torch.Tensor:
    """A head's input: ``features[name]`` of a backbone's feature dict, or ``features`` when given a tensor."""
    if isinstance(features, dict):
        if name not in features:
            raise KeyError(f"the head reads feature {name!r}; the backbone gives {sorted(features)}")
        return features[name]
    return features


class GlobalAvgPool2d(nn.Module):
    """Global average pooling to (B, C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)
