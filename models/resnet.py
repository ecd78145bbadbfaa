"""ResNet backbones in the In-Place ABN layout (``mod1`` ... ``mod5``), with output stride 8 or 16.

``forward(x) -> (mod5 output, [pre-activation of the last block of mod2, mod3, mod4, mod5])``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from models.pretrained import load_backbone_file
from modules.residual import ResidualBlock

DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


class ResNet(nn.Module):
    """Post-activation ResNet. ``structure`` = blocks per stage (mod2..mod5); ``bottleneck`` selects the block."""

    def __init__(self, structure: Sequence[int], bottleneck: bool, norm_act: Callable[..., nn.Module],
                 output_stride: int = 16):
        super().__init__()
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if len(structure) != 4:
            raise ValueError(f"structure must have 4 stages, got {structure}")
        dilation = DILATIONS[output_stride]
        self.structure = tuple(structure)
        self.output_stride = output_stride

        layers = [("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)), ("bn1", norm_act(64))]
        if dilation[0] == 1:
            layers.append(("pool1", nn.MaxPool2d(3, stride=2, padding=1)))
        self.mod1 = nn.Sequential(OrderedDict(layers))

        in_channels = 64
        channels = [64, 64, 256] if bottleneck else [64, 64]
        for stage, num_blocks in enumerate(structure):
            blocks = []
            for block in range(num_blocks):
                d = dilation[stage]
                stride = 2 if (d == 1 and block == 0 and stage > 0) else 1
                blocks.append((f"block{block + 1}", ResidualBlock(in_channels, channels, norm_act, stride=stride,
                                                                  dilation=d, last=block == num_blocks - 1)))
                in_channels = channels[-1]
            self.add_module(f"mod{stage + 2}", nn.Sequential(OrderedDict(blocks)))
            channels = [c * 2 for c in channels]
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor):
        attentions = []
        x = self.mod1(x)
        for name in ("mod2", "mod3", "mod4", "mod5"):
            x, pre = getattr(self, name)(x)
            attentions.append(pre)
        return x, attentions


STRUCTURES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


def build_backbone(name: str, norm_act: Callable[..., nn.Module], output_stride: int = 16) -> ResNet:
    """``name`` in :data:`STRUCTURES`."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(STRUCTURES)}")
    structure, bottleneck = STRUCTURES[name]
    return ResNet(structure, bottleneck, norm_act, output_stride)


def load_pretrained_body(body: nn.Module, path: str) -> None:
    """Load an ImageNet backbone file in the In-Place ABN layout strictly into ``body`` (``classifier.*``, the
    ImageNet fc, dropped)."""
    load_backbone_file(body, path, drop_prefix="classifier.", layout="In-Place ABN layout",
                       hint="download it (see pretrained/README.md) or pass --no_pretrained")
