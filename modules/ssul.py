"""SSUL's model parts (Cha et al., NeurIPS 2021; clovaai/SSUL e08ee9c, ``network/_deeplab.py``), registered here:

* classifier ``conv_head``: 3x3 conv (no bias) - BN - ReLU - 1x1 conv with bias, one per step; keys
  ``cls.{i}.0.weight``, ``cls.{i}.1.*``, ``cls.{i}.3.weight``, ``cls.{i}.3.bias``.
* head layout ``unknown_first``: an *unknown* and a *background* head of one channel each in front of the step-0
  foreground classes, then one head per later step.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from modules.aspp import init_conv_bn
from modules.registry import CLASSIFIERS, HEAD_LAYOUTS


@CLASSIFIERS.register("conv_head")
def conv_head_classifier(channels: int, n_classes: int) -> nn.Module:
    head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Conv2d(channels, n_classes, 1, bias=True))
    init_conv_bn(head)
    return head


@HEAD_LAYOUTS.register("unknown_first")
def unknown_first_layout(classes: Sequence[int]) -> list[int]:
    return [1, 1, classes[0] - 1, *classes[1:]]
