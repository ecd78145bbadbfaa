"""DeepLab-v3 head in torchvision's layout (SSUL's ``network/_deeplab.py``): ASPP with Conv-BN-ReLU branches (1x1,
three dilated 3x3, image pooling), concatenation, 1x1 projection with BN, ReLU and dropout 0.1.

State-dict keys follow torchvision/SSUL (``convs.0.0.weight`` ... ``convs.4.1.weight``, ``project.0.weight``), so
SSUL checkpoints map onto it by renaming ``classifier.aspp.`` to ``head.``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.misc import pick
from modules.registry import HEADS, ShapeSpec

ASPP_RATES = {32: (3, 6, 9), 16: (6, 12, 18), 8: (12, 24, 36)}
DROPOUT = 0.1  # SSUL/torchvision ASPP projection


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> list[nn.Module]:
    padding = 0 if kernel == 1 else dilation
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average, 1x1 conv-BN-ReLU, upsampled back to the feature size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """``forward(features) -> (B, out, h, w)`` on ``features[in_feature]`` (B, in, h, w); Kaiming-normal convs, BN
    weight 1 / bias 0 (as SSUL)."""

    def __init__(self, in_channels: int, out_channels: int = 256, output_stride: int = 16,
                 in_feature: str | None = None):
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output_stride must be one of {sorted(ASPP_RATES)}, got {output_stride}")
        self.in_feature = in_feature
        branches = [nn.Sequential(*_conv_bn_relu(in_channels, out_channels, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(in_channels, out_channels, 3, rate))
                     for rate in ASPP_RATES[output_stride]]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * out_channels, out_channels, 1),
                                     nn.Dropout(DROPOUT))
        init_conv_bn(self)

    def forward(self, features) -> torch.Tensor:
        x = pick(features, self.in_feature)
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


@HEADS.register("aspp")
def build_aspp(spec, shapes: dict[str, ShapeSpec], in_feature: str) -> ASPP:
    """torchvision's ASPP head on ``in_feature`` (always BatchNorm + ReLU)."""
    shape = shapes[in_feature]
    return ASPP(shape.channels, spec.head_channels, shape.stride, in_feature=in_feature)


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal conv weights, BN weight 1 and bias 0 (SSUL ``_deeplab.py`` init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
