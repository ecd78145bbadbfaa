"""Backbone families, registered by name: the In-Place ABN layout ResNets of the reference code (``resnet18``,
``resnet50``, ``resnet101``), torchvision-layout ResNets with plain BatchNorm (``tv_resnet18`` ... ``tv_resnet101``)
and RCIL's twin-branch variant of the first (``rcil_resnet*``, chosen by ``--method RCIL``).

A backbone maps ``(B, 3, H, W)`` to ``(features (B, out_channels, H/os, W/os), [pre-activation of the last block of
each of the four stages])`` and has an ``out_channels`` attribute. ``BACKBONES[name]`` says how to build one, which
ImageNet file of ``pretrained/`` it loads and how.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from models.resnet import STRUCTURES, ResNet, build_backbone, load_pretrained_body, load_pretrained_twin_body
from models.tv_resnet import STRUCTURES as TV_STRUCTURES
from models.tv_resnet import TORCHVISION_FILES, TorchvisionResNet, build_tv_backbone, load_torchvision_weights
from modules.norm import NORM_ACT
from modules.rcil import TwinResidualBlock


@dataclass(frozen=True)
class BackboneFamily:
    """How to build a backbone of one registered name and load its ImageNet weights."""

    build: Callable[..., nn.Module]  # (norm_act name, output_stride, bn_momentum or None) -> backbone
    pretrained_file: Callable[[str], str]  # norm_act name -> file name under pretrained/
    load_pretrained: Callable[[nn.Module, str], None]
    uses_norm_act: bool  # whether --norm_act chooses the backbone's norm layers
    description: str
    selectable: bool = True  # offered by --backbone (False: a method's own family, chosen by its model_spec)


def _iabn(name: str) -> BackboneFamily:
    return BackboneFamily(
        build=lambda norm_act, output_stride, bn_momentum=None: build_backbone(name, NORM_ACT[norm_act],
                                                                               output_stride),
        pretrained_file=lambda norm_act: f"{name}_{norm_act}.pth.tar", load_pretrained=load_pretrained_body,
        uses_norm_act=True, description="In-Place ABN layout (reference code), norm layers from --norm_act")


def _torchvision(name: str) -> BackboneFamily:
    return BackboneFamily(
        build=lambda norm_act, output_stride, bn_momentum=None: build_tv_backbone(
            name, output_stride, 0.1 if bn_momentum is None else bn_momentum),
        pretrained_file=lambda norm_act: TORCHVISION_FILES[name], load_pretrained=load_torchvision_weights,
        uses_norm_act=False, description="torchvision layout, BatchNorm2d + ReLU (SSUL and later work)")


def _rcil(name: str) -> BackboneFamily:
    """RCIL: the reference layout with a twin of every block's 3x3 conv and norm, norms without activation."""
    return BackboneFamily(
        build=lambda norm_act, output_stride, bn_momentum=None: build_backbone(
            name, NORM_ACT[norm_act], output_stride, block=TwinResidualBlock, stem_activation="identity"),
        pretrained_file=lambda norm_act: f"{name}_{norm_act}.pth.tar", load_pretrained=load_pretrained_twin_body,
        uses_norm_act=True, description="RCIL: In-Place ABN layout with twin 3x3 branches (--method RCIL)",
        selectable=False)


BACKBONES: dict[str, BackboneFamily] = {**{n: _iabn(n) for n in STRUCTURES}, **{n: _torchvision(n) for n in TV_STRUCTURES},
                                        **{f"rcil_{n}": _rcil(n) for n in STRUCTURES}}

__all__ = ["BACKBONES", "BackboneFamily", "ResNet", "TorchvisionResNet", "build_backbone", "build_tv_backbone",
           "load_pretrained_body", "load_torchvision_weights"]
