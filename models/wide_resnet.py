"""Wider ResNets with pre-activation ("identity mapping") blocks in the In-Place ABN layout: WILSON's COCO-to-VOC
backbone ``wider_resnet38_a2`` (and the 16 and 20 block variants of the same family).

Layout (module names are the checkpoint format of ``wide_resnet38_ipabn_lr_256.pth.tar``): ``mod1.conv1`` (3x3, 64,
stride 1), then six stages ``mod2`` ... ``mod7`` of ``block{k}`` with ``bn1`` (norm + activation of the block input),
``convs.{conv1, bn2, conv2[, bn3, conv3]}`` and, where the shape changes, ``proj_conv`` (1x1 on the normalised input);
max-pooling (3x3, stride 2) before ``mod2`` and ``mod3``; ``bn_out`` after ``mod7``. Channels per stage: (128, 128),
(256, 256), (512, 512), (512, 1024), bottlenecks (512, 1024, 2048) and (1024, 2048, 4096); dropout 0.3 in ``mod6`` and
0.5 in ``mod7`` after the middle conv. Down-sampling: ``mod4``'s first block has stride 2 (total 8); at output stride 8
``mod5`` is dilated 2 and ``mod6``, ``mod7`` 4 (WILSON's only setting); at 16 ``mod5`` has stride 2 and ``mod6``,
``mod7`` dilation 2; at 32 ``mod5`` and ``mod6`` have stride 2.

``forward(x) -> {"mod2" ... "mod7": each stage's output (a block's output is its un-normalised sum, the
pre-activation), "out": bn_out(mod7)}``; the head reads ``out`` (4096 channels).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from models.pretrained import load_backbone_file
from models.registry import Backbone, BackboneFamily, register_backbone
from modules.norm import NORM_ACT
from modules.registry import ShapeSpec

CHANNELS = ((128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096))
DROPOUT = (None, None, None, None, 0.3, 0.5)
STRUCTURES = {"wider_resnet16_a2": (1, 1, 1, 1, 1, 1), "wider_resnet20_a2": (1, 1, 1, 3, 1, 1),
              "wider_resnet38_a2": (3, 3, 6, 3, 1, 1)}
# output stride -> (stride of the first block, dilation) of mod4 ... mod7 (mod2 and mod3 are reached by max-pooling)
SCHEDULES = {8: ((2, 1), (1, 2), (1, 4), (1, 4)), 16: ((2, 1), (2, 1), (1, 2), (1, 2)),
             32: ((2, 1), (2, 1), (2, 1), (1, 1))}
PRETRAINED_FILE = "wide_resnet38_ipabn_lr_256.pth.tar"  # WILSON's name for the ImageNet weights of the 38-block net


class IdentityResidualBlock(nn.Module):
    """Pre-activation block: ``convs(bn1(x)) + shortcut``, shortcut = ``proj_conv(bn1(x))`` when the shape changes,
    else ``x``. Two channels: 3x3 -> 3x3; three: 1x1 -> 3x3 -> 1x1 (the stride on the first conv, the dilation on
    the 3x3 ones)."""

    def __init__(self, in_channels: int, channels: Sequence[int], norm_act: Callable[..., nn.Module], stride: int = 1,
                 dilation: int = 1, dropout: float | None = None):
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 or 3 entries, got {channels}")
        self.bn1 = norm_act(in_channels)
        # the In-Place ABN package overwrites its input: the identity shortcut must be a copy then
        self._copy_shortcut = type(self.bn1).__module__.startswith("inplace_abn")
        if len(channels) == 2:
            layers = [("conv1", nn.Conv2d(in_channels, channels[0], 3, stride=stride, padding=dilation,
                                          dilation=dilation, bias=False)),
                      ("bn2", norm_act(channels[0])),
                      ("conv2", nn.Conv2d(channels[0], channels[1], 3, padding=dilation, dilation=dilation,
                                          bias=False))]
            cut = 2
        else:
            layers = [("conv1", nn.Conv2d(in_channels, channels[0], 1, stride=stride, bias=False)),
                      ("bn2", norm_act(channels[0])),
                      ("conv2", nn.Conv2d(channels[0], channels[1], 3, padding=dilation, dilation=dilation,
                                          bias=False)),
                      ("bn3", norm_act(channels[1])),
                      ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False))]
            cut = 4
        if dropout is not None:
            layers.insert(cut, ("dropout", nn.Dropout2d(p=dropout)))
        self.convs = nn.Sequential(OrderedDict(layers))
        self.proj_conv = (nn.Conv2d(in_channels, channels[-1], 1, stride=stride, bias=False)
                          if stride != 1 or in_channels != channels[-1] else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj_conv is not None:
            normed = self.bn1(x)
            shortcut = self.proj_conv(normed)
        else:
            shortcut = x.clone() if self._copy_shortcut else x
            normed = self.bn1(x)
        return self.convs(normed) + shortcut


class WiderResNetA2(Backbone):
    out_feature = "out"
    stage_features = ("mod2", "mod3", "mod4", "mod5", "mod6", "mod7")

    def __init__(self, structure: Sequence[int], norm_act: Callable[..., nn.Module], output_stride: int = 8):
        super().__init__()
        if output_stride not in SCHEDULES:
            raise ValueError(f"output_stride must be one of {sorted(SCHEDULES)}, got {output_stride}")
        if len(structure) != 6:
            raise ValueError(f"structure must have 6 stages, got {structure}")
        self.mod1 = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(3, 64, 3, padding=1, bias=False))]))
        schedule = ((1, 1), (1, 1)) + SCHEDULES[output_stride]
        in_channels, stride, shapes = 64, 1, {}
        for index, (blocks, channels) in enumerate(zip(structure, CHANNELS)):
            first_stride, dilation = schedule[index]
            if index < 2:
                self.add_module(f"pool{index + 2}", nn.MaxPool2d(3, stride=2, padding=1))
                stride *= 2
            stage = []
            for k in range(blocks):
                stage.append((f"block{k + 1}", IdentityResidualBlock(
                    in_channels, channels, norm_act, stride=first_stride if k == 0 else 1, dilation=dilation,
                    dropout=DROPOUT[index])))
                in_channels = channels[-1]
            stride *= first_stride
            self.add_module(f"mod{index + 2}", nn.Sequential(OrderedDict(stage)))
            shapes[f"mod{index + 2}"] = ShapeSpec(in_channels, stride)
        self.bn_out = norm_act(in_channels)
        shapes["out"] = ShapeSpec(in_channels, stride)
        self._shapes = shapes

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        x = self.mod1(x)
        for index in range(6):
            if index < 2:
                x = getattr(self, f"pool{index + 2}")(x)
            x = getattr(self, f"mod{index + 2}")(x)
            features[f"mod{index + 2}"] = x
        features["out"] = self.bn_out(x)
        return features


def load_wide_resnet(body: nn.Module, path: str) -> None:
    """Strict load of the In-Place ABN ImageNet file (``module.`` prefixes and ``classifier.fc`` dropped)."""
    load_backbone_file(body, path, drop_prefix="classifier.", layout="Wide-ResNet (In-Place ABN layout)",
                       hint=f"download WILSON's {PRETRAINED_FILE} (see pretrained/README.md) or pass --no_pretrained")


def _family(name: str) -> BackboneFamily:
    return BackboneFamily(
        build=lambda *, norm_act, output_stride, bn_momentum=None: WiderResNetA2(
            STRUCTURES[name], NORM_ACT[norm_act], output_stride),
        pretrained_file=lambda norm_act: PRETRAINED_FILE if name == "wider_resnet38_a2" else f"{name}_{norm_act}.pth.tar",
        load_pretrained=load_wide_resnet, uses_norm_act=True,
        description="Wide-ResNet A2, pre-activation blocks, In-Place ABN layout (WILSON's COCO backbone)",
        strides=(8, 16, 32), default_stride=8, arch=name, layout="inplace_abn")


for _name in STRUCTURES:
    register_backbone(_name, _family(_name))
