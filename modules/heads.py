"""Per-step classifiers: what maps the head's features (B, C, h, w) to one step's logits (B, n, h, w).

* :func:`linear_classifier`: a 1x1 conv with bias (the reference code; keys ``cls.{i}.weight`` / ``cls.{i}.bias``).
* :func:`conv_head_classifier`: 3x3 conv (no bias) - BN - ReLU - 1x1 conv with bias, one per step (SSUL); keys
  ``cls.{i}.0.weight``, ``cls.{i}.1.*``, ``cls.{i}.3.weight``, ``cls.{i}.3.bias``. ``final_layer`` returns the 1x1
  conv of either kind: the layer whose input AWT attributes and whose rows weight transfer copies.
"""
from __future__ import annotations

from torch import nn

from modules.aspp import init_conv_bn


def linear_classifier(channels: int, n_classes: int) -> nn.Module:
    return nn.Conv2d(channels, n_classes, 1, bias=True)


def conv_head_classifier(channels: int, n_classes: int) -> nn.Module:
    head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Conv2d(channels, n_classes, 1, bias=True))
    init_conv_bn(head)
    return head


def final_layer(classifier: nn.Module) -> nn.Module:
    """The layer producing the logits of a per-step classifier: the last module of a head, the classifier itself
    otherwise."""
    return classifier[-1] if isinstance(classifier, nn.Sequential) else classifier
