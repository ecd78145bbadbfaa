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
                 output_stride: int = 16, block: Callable[..., nn.Module] = ResidualBlock,
                 stem_activation: str | None = None):
        super().__init__()
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if len(structure) != 4:
            raise ValueError(f"structure must have 4 stages, got {structure}")
        dilation = DILATIONS[output_stride]
        self.structure = tuple(structure)
        self.output_stride = output_stride

        stem_norm = norm_act(64) if stem_activation is None else norm_act(64, activation=stem_activation)
        layers = [("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)), ("bn1", stem_norm)]
        if dilation[0] == 1:
            layers.append(("pool1", nn.MaxPool2d(3, stride=2, padding=1)))
        self.mod1 = nn.Sequential(OrderedDict(layers))

        in_channels = 64
        channels = [64, 64, 256] if bottleneck else [64, 64]
        for stage, num_blocks in enumerate(structure):
            blocks = []
            for i in range(num_blocks):
                d = dilation[stage]
                stride = 2 if (d == 1 and i == 0 and stage > 0) else 1
                blocks.append((f"block{i + 1}", block(in_channels, channels, norm_act, stride=stride, dilation=d,
                                                      last=i == num_blocks - 1)))
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


def build_backbone(name: str, norm_act: Callable[..., nn.Module], output_stride: int = 16, **kwargs) -> ResNet:
    """``name`` in :data:`STRUCTURES`; ``kwargs``: ``block`` and ``stem_activation`` of :class:`ResNet`."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(STRUCTURES)}")
    structure, bottleneck = STRUCTURES[name]
    return ResNet(structure, bottleneck, norm_act, output_stride, **kwargs)


def load_pretrained_body(body: nn.Module, path: str) -> None:
    """Load an ImageNet backbone file in the In-Place ABN layout strictly into ``body`` (``classifier.*``, the
    ImageNet fc, dropped)."""
    load_backbone_file(body, path, drop_prefix="classifier.", layout="In-Place ABN layout",
                       hint="download it (see pretrained/README.md) or pass --no_pretrained")


def twin_state(state: dict, own: dict) -> dict:
    """The ImageNet state of the reference layout for a backbone with RCIL's twin branches: each twin gets a copy
    of the pretrained 3x3 conv and norm it doubles (RCIL's loader), and the merge state and the zero biases of the
    twinned convs come from the new backbone."""
    out = dict(state)
    for key in own:
        if "_new." in key:
            source = key.replace("_new.", ".")
            if source in state:
                out[key] = state[source]
        elif key not in state and (key.endswith("merged") or key.endswith(".bias")):
            out[key] = own[key]
    return out


def load_pretrained_twin_body(body: nn.Module, path: str) -> None:
    """:func:`load_pretrained_body` for RCIL's twin-branch backbone (:func:`twin_state`)."""
    load_backbone_file(body, path, drop_prefix="classifier.", layout="In-Place ABN layout",
                       hint="download it (see pretrained/README.md) or pass --no_pretrained", transform=twin_state)
