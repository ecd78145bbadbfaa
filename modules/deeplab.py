"""DeepLab-v3 head: ASPP (1x1 + three dilated 3x3) plus an image-pooling branch, summed and normalised; registered
as the ``deeplabv3`` head (the reference layout, norm layers from ``--norm_act``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modules.norm import NORM_ACT, is_norm_layer
from modules.misc import pick, try_index
from modules.registry import HEADS, ShapeSpec

# 32 (not 36) for OS8, as in the reference; stride-32 features (hierarchical backbones) halve the OS16 rates
ASPP_DILATIONS = {32: (3, 6, 9), 16: (6, 12, 18), 8: (12, 24, 32)}


class DeeplabV3(nn.Module):
    """``forward(features) -> (B, out, h, w)``: ``features[in_feature]`` (B, in, h, w) of the backbone's feature
    dict (or that tensor itself).

    Image pooling: global mean in training or when ``pooling_size`` is None; in eval mode an average pool with
    window ``min(p, h) x min(p, w)`` and stride 1, replicate-padded back to ``h x w``.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 256, out_stride: int = 16,
                 norm_act: Callable[..., nn.Module] | None = None, pooling_size: int | tuple | None = None,
                 in_feature: str | None = None, rates: tuple[int, int, int] | None = None):
        super().__init__()
        if rates is None and out_stride not in ASPP_DILATIONS:
            raise ValueError(f"out_stride must be one of {sorted(ASPP_DILATIONS)}, got {out_stride}")
        if rates is not None and (len(rates) != 3 or any(int(r) < 1 for r in rates)):
            raise ValueError(f"rates must be three positive dilations, got {rates}")
        self.in_feature = in_feature
        if norm_act is None:
            norm_act = NORM_ACT["abn"]
        self.pooling_size = pooling_size
        d = tuple(int(r) for r in rates) if rates is not None else ASPP_DILATIONS[out_stride]
        self.map_convs = nn.ModuleList([
            nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
            nn.Conv2d(in_channels, hidden_channels, 3, bias=False, dilation=d[0], padding=d[0]),
            nn.Conv2d(in_channels, hidden_channels, 3, bias=False, dilation=d[1], padding=d[1]),
            nn.Conv2d(in_channels, hidden_channels, 3, bias=False, dilation=d[2], padding=d[2]),
        ])
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        self.reset_parameters(self.map_bn.activation, self.map_bn.activation_param)

    def reset_parameters(self, activation: str, slope: float) -> None:
        gain = nn.init.calculate_gain("linear" if activation == "identity" else activation, slope)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif is_norm_layer(m):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features) -> torch.Tensor:
        x = pick(features, self.in_feature)
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.map_bn(out))
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(self._global_pooling(x))))
        if pool.shape[-2:] != out.shape[-2:]:
            pool = pool.expand(-1, -1, out.shape[2], out.shape[3])
        return self.red_bn(out + pool)

    def _global_pooling(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        ph = min(try_index(self.pooling_size, 0), x.shape[2])
        pw = min(try_index(self.pooling_size, 1), x.shape[3])
        pad = ((pw - 1) // 2, pw // 2, (ph - 1) // 2, ph // 2)  # left, right, top, bottom: output back to h x w
        pool = F.avg_pool2d(x, (ph, pw), stride=1)
        return F.pad(pool, pad, mode="replicate")


@HEADS.register("deeplabv3")
def build_deeplabv3(spec, shapes: dict[str, ShapeSpec], in_feature: str) -> DeeplabV3:
    """The reference head on ``in_feature``, its ASPP rates from that feature's stride (or ``spec.aspp_rates``)."""
    shape = shapes[in_feature]
    return DeeplabV3(shape.channels, spec.head_channels, spec.head_channels, out_stride=shape.stride,
                     norm_act=NORM_ACT[spec.norm_act], pooling_size=spec.pooling, in_feature=in_feature,
                     rates=spec.aspp_rates)
