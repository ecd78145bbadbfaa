"""SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021), registered as the head ``segformer``.

Every backbone feature (one per stage: the ``*_pre`` twins of the ResNets are left out) is mapped to
``head_channels`` by a per-pixel linear layer (a 1x1 conv), upsampled bilinearly to the finest stage, concatenated
deepest first, fused by a 1x1 conv + BatchNorm + ReLU and passed through dropout 0.1; the classifiers read the
result, at the finest stage's stride (4 for the hierarchical backbones). SegFormer's decoder width is 256 for
MiT-B0/B1 and 768 for B2-B5; here it is ``head_channels`` (256), which AWT's channel masks and the classifiers share
with every other head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.registry import HEADS, ShapeSpec


class AllMLPDecoder(nn.Module):
    def __init__(self, shapes: dict[str, ShapeSpec], channels: int, dropout: float = 0.1):
        super().__init__()
        stages = [n for n in shapes if not n.endswith("_pre")]
        self.names = sorted(stages, key=lambda n: shapes[n].stride)  # finest first
        self.output_stride = shapes[self.names[0]].stride
        self.linear = nn.ModuleDict({n: nn.Conv2d(shapes[n].channels, channels, 1) for n in self.names})
        self.fuse = nn.Sequential(nn.Conv2d(len(self.names) * channels, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        size = features[self.names[0]].shape[-2:]
        maps = [F.interpolate(self.linear[n](features[n]), size=size, mode="bilinear", align_corners=False)
                for n in reversed(self.names)]
        return self.dropout(self.fuse(torch.cat(maps, dim=1)))


@HEADS.register("segformer")
def build_segformer_head(spec, shapes: dict[str, ShapeSpec], in_feature: str) -> AllMLPDecoder:
    """Reads every stage; ``in_feature`` (a single-input head's choice) does not apply."""
    return AllMLPDecoder(shapes, spec.head_channels)
