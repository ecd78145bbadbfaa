"""ResNet backbones in the In-Place ABN layout (``mod1`` ... ``mod5``), with output stride 8, 16 or 32; registered as
``resnet18``, ``resnet50`` and ``resnet101`` (option ``block``: a residual block kind of ``modules.registry.BLOCKS``).

``forward(x) -> {"res2" ... "res5": the output of mod2 ... mod5, "res2_pre" ... "res5_pre": the pre-activation of
the last block of each stage}``; distillation reads the pre-activations (PLOP's POD), the head ``res5``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from models.pretrained import load_backbone_file
from models.registry import Backbone, BackboneFamily, register_backbone
from modules.norm import NORM_ACT
from modules.registry import BLOCKS, ShapeSpec
from modules.residual import ResidualBlock

DILATIONS = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}
STAGES = ("mod2", "mod3", "mod4", "mod5")
FEATURES = ("res2", "res3", "res4", "res5")


class ResNet(Backbone):
    """Post-activation ResNet. ``structure`` = blocks per stage (mod2..mod5); ``bottleneck`` selects the block."""

    out_feature = "res5"
    stage_features = tuple(f"{name}_pre" for name in FEATURES)

    def __init__(self, structure: Sequence[int], bottleneck: bool, norm_act: Callable[..., nn.Module],
                 output_stride: int = 16, block: Callable[..., nn.Module] = ResidualBlock,
                 stem_activation: str | None = None, block_kind: str = "residual"):
        super().__init__()
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
        if len(structure) != 4:
            raise ValueError(f"structure must have 4 stages, got {structure}")
        dilation = DILATIONS[output_stride]
        self.structure = tuple(structure)
        self.output_stride = output_stride
        self.block_kind = block_kind  # which BLOCKS entry adapts ImageNet files to this backbone

        stem_norm = norm_act(64) if stem_activation is None else norm_act(64, activation=stem_activation)
        layers = [("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)), ("bn1", stem_norm)]
        if dilation[0] == 1:
            layers.append(("pool1", nn.MaxPool2d(3, stride=2, padding=1)))
        self.mod1 = nn.Sequential(OrderedDict(layers))

        in_channels, stride = 64, 4 if dilation[0] == 1 else 2
        channels = [64, 64, 256] if bottleneck else [64, 64]
        shapes = {}
        for stage, num_blocks in enumerate(structure):
            blocks = []
            for i in range(num_blocks):
                d = dilation[stage]
                block_stride = 2 if (d == 1 and i == 0 and stage > 0) else 1
                blocks.append((f"block{i + 1}", block(in_channels, channels, norm_act, stride=block_stride,
                                                      dilation=d, last=i == num_blocks - 1)))
                stride *= block_stride
                in_channels = channels[-1]
            self.add_module(STAGES[stage], nn.Sequential(OrderedDict(blocks)))
            shapes[FEATURES[stage]] = shapes[f"{FEATURES[stage]}_pre"] = ShapeSpec(in_channels, stride)
            channels = [c * 2 for c in channels]
        self._shapes = shapes

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        x = self.mod1(x)
        for stage, name in zip(STAGES, FEATURES):
            x, pre = getattr(self, stage)(x)
            features[f"{name}_pre"] = pre
            features[name] = x
        return features


STRUCTURES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


def build_backbone(name: str, norm_act: Callable[..., nn.Module], output_stride: int = 16,
                   block: str = "residual") -> ResNet:
    """``name`` in :data:`STRUCTURES`; ``block`` a residual block kind of ``modules.registry.BLOCKS``."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(STRUCTURES)}")
    structure, bottleneck = STRUCTURES[name]
    kind = BLOCKS.get_entry(block, "backbone option block")
    return ResNet(structure, bottleneck, norm_act, output_stride, block=kind.block,
                  stem_activation=kind.stem_activation, block_kind=block)


def load_pretrained_body(body: nn.Module, path: str) -> None:
    """Load an ImageNet backbone file in the In-Place ABN layout strictly into ``body`` (``classifier.*``, the
    ImageNet fc, dropped); a block kind that extends the layout adapts the file (``BlockKind.adapt_pretrained``)."""
    kind = BLOCKS.get_entry(getattr(body, "block_kind", "residual"), "backbone option block")
    load_backbone_file(body, path, drop_prefix="classifier.", layout="In-Place ABN layout",
                       hint="download it (see pretrained/README.md) or pass --no_pretrained",
                       transform=kind.adapt_pretrained)


def _family(name: str) -> BackboneFamily:
    return BackboneFamily(
        build=lambda *, norm_act, output_stride, bn_momentum=None, block="residual": build_backbone(
            name, NORM_ACT[norm_act], output_stride, block=block),
        pretrained_file=lambda norm_act: f"{name}_{norm_act}.pth.tar", load_pretrained=load_pretrained_body,
        uses_norm_act=True, description="In-Place ABN layout (reference code), norm layers from --norm_act",
        strides=(8, 16, 32), options=("block",), arch=name, layout="inplace_abn")


for _name in STRUCTURES:
    register_backbone(_name, _family(_name))
