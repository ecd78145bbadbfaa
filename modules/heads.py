"""Per-step classifiers: what maps the head's features (B, C, h, w) to one step's logits (B, n, h, w).

* ``conv1x1`` (:func:`linear_classifier`): a 1x1 conv with bias (the reference code; keys ``cls.{i}.weight`` /
  ``cls.{i}.bias``).
* ``per_step`` layout: one classifier per step, background in the first (the reference).

Other classifier kinds register from their own files (e.g. ``modules/ssul.py``). ``final_layer`` returns the layer
producing a classifier's logits: the layer whose input AWT attributes and whose rows weight transfer copies.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from modules.registry import CLASSIFIERS, HEAD_LAYOUTS


@CLASSIFIERS.register("conv1x1")
def linear_classifier(channels: int, n_classes: int) -> nn.Module:
    return nn.Conv2d(channels, n_classes, 1, bias=True)


@HEAD_LAYOUTS.register("per_step")
def per_step_layout(classes: Sequence[int]) -> list[int]:
    return list(classes)


def final_layer(classifier: nn.Module) -> nn.Module:
    """The layer producing the logits of a per-step classifier: the last module of a head, the classifier itself
    otherwise."""
    return classifier[-1] if isinstance(classifier, nn.Sequential) else classifier
