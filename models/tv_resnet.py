"""ResNet in torchvision's layout (``conv1 bn1 layer1..layer4``, plain BatchNorm + ReLU), as SSUL and most recent
continual-segmentation code use it; loads torchvision's ImageNet state dicts (``resnet101-5d3b4d8f.pth`` ...).

The stride of a bottleneck sits on its 3x3 conv (torchvision's "ResNet v1.5"); output stride 16 / 8 replaces the
stride of the last one / two stages by dilation exactly as torchvision's ``replace_stride_with_dilation`` does (the
first block of a dilated stage keeps the previous dilation).

``forward(x) -> {"res2" ... "res5": the outputs of layer1 ... layer4, "res2_pre" ... "res5_pre": their last block's
pre-activation}``, the same names as :class:`models.resnet.ResNet`, so every loss term that reads backbone features
works on both layouts. Registered as ``tv_resnet18``, ``tv_resnet50`` and ``tv_resnet101``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.pretrained import load_backbone_file
from models.registry import Backbone, BackboneFamily, register_backbone
from modules.registry import ShapeSpec

REPLACE_STRIDE = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
FEATURES = ("res2", "res3", "res4", "res5")
STRUCTURES = {"tv_resnet18": ((2, 2, 2, 2), False), "tv_resnet50": ((3, 4, 6, 3), True),
              "tv_resnet101": ((3, 4, 23, 3), True)}
# torchvision's ImageNet files, as downloaded from download.pytorch.org/models/ (IMAGENET1K_V1 weights)
TORCHVISION_FILES = {"tv_resnet18": "resnet18-f37072fd.pth", "tv_resnet50": "resnet50-0676ba61.pth",
                     "tv_resnet101": "resnet101-5d3b4d8f.pth"}


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = _bn(planes, momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(planes, momentum)
        self.downsample = downsample

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (self.downsample(x) if self.downsample is not None else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes, momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(planes, momentum)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion, momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (self.downsample(x) if self.downsample is not None else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x))


class TorchvisionResNet(Backbone):
    """torchvision's ResNet without ``avgpool``/``fc``; ``bn_momentum`` is PyTorch's BN momentum (SSUL: 0.01)."""

    out_feature = "res5"
    stage_features = tuple(f"{name}_pre" for name in FEATURES)

    def __init__(self, structure: Sequence[int], bottleneck: bool, output_stride: int = 16,
                 bn_momentum: float = 0.1):
        super().__init__()
        if output_stride not in REPLACE_STRIDE:
            raise ValueError(f"output_stride must be one of {sorted(REPLACE_STRIDE)}, got {output_stride}")
        block = Bottleneck if bottleneck else BasicBlock
        self.inplanes, self.dilation, self.momentum = 64, 1, bn_momentum
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(64, bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = (False,) + REPLACE_STRIDE[output_stride]
        stride, self._shapes = 4, {}
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), structure)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, planes, blocks, 1 if i == 0 else 2, dilate[i]))
            stride *= 1 if (i == 0 or dilate[i]) else 2
            self._shapes[FEATURES[i]] = self._shapes[f"{FEATURES[i]}_pre"] = ShapeSpec(planes * block.expansion,
                                                                                      stride)
        self.output_stride = output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride,
                                                 bias=False), _bn(planes * block.expansion, self.momentum))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation, self.momentum)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation, momentum=self.momentum)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = {}
        for i, name in enumerate(FEATURES):
            layer = getattr(self, f"layer{i + 1}")
            for block in list(layer)[:-1]:
                x = block(x)
            pre = layer[-1].pre_activation(x)
            x = torch.relu(pre)
            features[f"{name}_pre"], features[name] = pre, x
        return features


def build_tv_backbone(name: str, output_stride: int = 16, bn_momentum: float = 0.1) -> TorchvisionResNet:
    if name not in STRUCTURES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(STRUCTURES)}")
    structure, bottleneck = STRUCTURES[name]
    return TorchvisionResNet(structure, bottleneck, output_stride, bn_momentum)


def load_torchvision_weights(body: nn.Module, path: str) -> None:
    """Load a torchvision ImageNet state dict strictly (``fc.*`` dropped, ``num_batches_tracked`` optional)."""
    load_backbone_file(body, path, drop_prefix="fc.", layout="torchvision-layout",
                       hint="put torchvision's ImageNet file there (see pretrained/README.md) or pass --no_pretrained")


def _family(name: str) -> BackboneFamily:
    return BackboneFamily(
        build=lambda *, norm_act, output_stride, bn_momentum=None: build_tv_backbone(
            name, output_stride, 0.1 if bn_momentum is None else bn_momentum),
        pretrained_file=lambda norm_act: TORCHVISION_FILES[name], load_pretrained=load_torchvision_weights,
        uses_norm_act=False, description="torchvision layout, BatchNorm2d + ReLU (SSUL and later work)",
        strides=(8, 16, 32), arch=name[len("tv_"):], layout="torchvision")


for _name in STRUCTURES:
    register_backbone(_name, _family(_name))
