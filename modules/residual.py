"""Post-activation residual block (basic and bottleneck), in the In-Place ABN ResNet layout; the ``residual`` block
kind of :data:`modules.registry.BLOCKS` (the default of the In-Place ABN ResNets).

Module names (``convs.conv1``, ``convs.bn1``, ..., ``proj_conv``, ``proj_bn``) are part of the checkpoint format.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from modules.norm import activate
from modules.registry import BLOCKS, BlockKind


class ResidualBlock(nn.Module):
    """``out = act(convs(x) + residual)``, act = the activation of ``convs.bn1`` (leaky ReLU 0.01 by default).

    ``channels`` has two entries (basic block: 3x3 -> 3x3) or three (bottleneck: 1x1 -> 3x3 -> 1x1); the stride and
    dilation go to the first 3x3 conv. The last norm of ``convs`` and ``proj_bn`` use the identity activation.
    With ``last=True`` the forward returns ``(activated, pre_activation)``.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], norm_act: Callable[..., nn.Module],
                 stride: int = 1, dilation: int = 1, last: bool = False):
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic) or 3 (bottleneck) entries, got {channels}")
        self.last = last
        out_channels = channels[-1]
        if len(channels) == 2:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 3, stride=stride, padding=dilation, dilation=dilation,
                                    bias=False)),
                ("bn1", norm_act(channels[0])),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride=1, padding=dilation, dilation=dilation,
                                    bias=False)),
                ("bn2", norm_act(channels[1], activation="identity")),
            ]
        else:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)),
                ("bn1", norm_act(channels[0])),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride=stride, padding=dilation, dilation=dilation,
                                    bias=False)),
                ("bn2", norm_act(channels[1])),
                ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False)),
                ("bn3", norm_act(channels[2], activation="identity")),
            ]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != out_channels:
            self.proj_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.proj_bn = norm_act(out_channels, activation="identity")
        else:
            self.proj_conv = None
            self.proj_bn = None

    def forward(self, x: torch.Tensor):
        residual = self.proj_bn(self.proj_conv(x)) if self.proj_conv is not None else x
        pre = self.convs(x) + residual
        bn1 = self.convs.bn1
        # in place is safe only when nobody keeps the pre-activation
        out = activate(pre, bn1.activation, bn1.activation_param, inplace=not self.last)
        if self.last:
            return out, pre
        return out


BLOCKS.add("residual", BlockKind(ResidualBlock))
