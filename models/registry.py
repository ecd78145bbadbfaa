"""The backbone contract and the registry of backbone families (``--backbone NAME``).

A backbone maps ``(B, 3, H, W)`` to a dict of named feature maps and says what they are:

* ``output_shape() -> {name: ShapeSpec(channels, stride)}`` (detectron2's contract);
* ``out_feature``: the deepest feature, what a single-input head reads by default;
* ``stage_features``: the per-stage maps that feature distillation reads (POD, PCKD), shallow to deep.

A :class:`BackboneFamily` says how to build a backbone of one registered name (``build(norm_act=..., output_stride=...,
bn_momentum=..., **options)``), which output strides it supports, which options it accepts (``ModelSpec``'s
``backbone_options``), and which ImageNet file of ``pretrained/`` it loads and how. Families register from their own
files with :func:`register_backbone`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from modules.registry import ShapeSpec
from utils.errors import UserError
from utils.registry import Registry


class Backbone(nn.Module):
    """Base class of the backbones: ``forward(x) -> {name: (B, C, H / stride, W / stride)}``."""

    out_feature: str = ""
    stage_features: tuple[str, ...] = ()

    def output_shape(self) -> dict[str, ShapeSpec]:
        raise NotImplementedError

    @property
    def out_channels(self) -> int:
        return self.output_shape()[self.out_feature].channels


@dataclass(frozen=True)
class BackboneFamily:
    """How to build a backbone of one registered name and load its ImageNet weights."""

    build: Callable[..., Backbone]  # (*, norm_act, output_stride, bn_momentum, **options) -> backbone
    pretrained_file: Callable[[str], str]  # norm_act name -> file name under pretrained/
    load_pretrained: Callable[[nn.Module, str], None]
    uses_norm_act: bool  # whether --norm_act chooses the backbone's norm layers
    description: str
    strides: tuple[int, ...] = (8, 16)  # output strides it can build
    default_stride: int = 16  # used when --output_stride is not given
    options: tuple[str, ...] = ()  # the backbone options it accepts (ModelSpec.backbone_options keys)
    arch: str = ""  # the architecture, e.g. "resnet101": families of several weight layouts share it
    layout: str = ""  # the weight layout, e.g. "inplace_abn", "torchvision"
    selectable: bool = True  # offered by --backbone
    default_head: str = "deeplabv3"  # the head (modules HEADS) its models get unless a method chooses another

    def check(self, name: str, output_stride: int, options: dict) -> None:
        if output_stride not in self.strides:
            raise UserError(f"--backbone {name} builds output stride {', '.join(map(str, self.strides))}, not "
                            f"--output_stride {output_stride}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise UserError(f"--backbone {name} takes no option {unknown[0]!r} (it takes: "
                            f"{', '.join(self.options) or 'none'})")


BACKBONES = Registry("--backbone")


def register_backbone(name: str, family: BackboneFamily) -> BackboneFamily:
    BACKBONES.add(name, family)
    return family


def family_in_layout(name: str, layout: str) -> str:
    """The registered backbone of the same architecture as ``name`` in the weight ``layout`` (``name`` itself when it
    is in that layout); ``UserError`` when none is registered."""
    family = BACKBONES.get_entry(name, "--backbone")
    if family.layout == layout:
        return name
    for other, candidate in BACKBONES.items():
        if candidate.arch == family.arch and candidate.layout == layout:
            return other
    raise UserError(f"--backbone {name} has no {layout}-layout variant; choose one of "
                    f"{', '.join(n for n, f in BACKBONES.items() if f.layout == layout) or '(none)'}")
