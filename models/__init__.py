"""Backbone families, registered by name from their own files (``models.registry.BACKBONES``): the In-Place ABN
layout ResNets of the reference code (``resnet18``, ``resnet50``, ``resnet101``), WILSON's Wide-ResNets
(``wider_resnet38_a2``, ``models/wide_resnet.py``) and torchvision-layout ResNets with
plain BatchNorm (``tv_resnet18`` ... ``tv_resnet101``), and the hierarchical transformer / ConvNeXt backbones of
Hugging Face ``transformers`` (``mit_b0`` ... ``mit_b5``, ``swin_t/s/b``, ``swin_b_w12``, ``convnext_t/s/b``;
``models/hierarchical.py``).

The backbone contract (named features with their channels and strides) is in ``models/registry.py``.
"""
from __future__ import annotations

from models import hierarchical as _hierarchical  # noqa: F401
from models import wide_resnet as _wide_resnet  # noqa: F401
from models.registry import BACKBONES, Backbone, BackboneFamily, family_in_layout, register_backbone
from models.resnet import ResNet, build_backbone, load_pretrained_body
from models.tv_resnet import TorchvisionResNet, build_tv_backbone, load_torchvision_weights

__all__ = ["BACKBONES", "Backbone", "BackboneFamily", "ResNet", "TorchvisionResNet", "build_backbone",
           "build_tv_backbone", "family_in_layout", "load_pretrained_body", "load_torchvision_weights",
           "register_backbone"]
