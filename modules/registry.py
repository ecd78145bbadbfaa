"""The registries of model parts below the backbone families, each filled by the part's own file (decorators):

* :data:`HEADS`: ``name -> build(spec, shapes, in_feature) -> module``; the module maps the backbone's feature dict
  to ``(B, head_channels, h, w)`` and reads its inputs by name (``in_feature``: the one a single-input head reads).
  A head whose output is not at ``in_feature``'s stride (a multi-scale decoder) sets ``output_stride``.
* :data:`CLASSIFIERS`: ``name -> build(channels, classes of one head) -> module`` (the per-step classifiers).
* :data:`HEAD_LAYOUTS`: ``name -> (classes per step) -> output channels of each classifier``.
* :data:`CLASSIFIER_WRAPPERS`: ``name -> build(spec, classes) -> module`` standing between the head's features and
  the classifiers (see :class:`ClassifierWrapper`).
* :data:`BLOCKS`: residual block kinds of the In-Place ABN ResNets (:class:`BlockKind`), chosen by the backbone
  option ``block``.

``ShapeSpec`` describes one named feature of a backbone (detectron2's ``output_shape()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from utils.registry import Registry


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (input pixels per feature pixel) of a named feature map."""

    channels: int
    stride: int


@dataclass(frozen=True)
class BlockKind:
    """A residual block kind: its class (the ``ResidualBlock`` signature), the stem's activation (None: the norm
    layer's default) and how an ImageNet file of the plain layout is adapted to it (None: unchanged)."""

    block: Callable[..., nn.Module]
    stem_activation: str | None = None
    adapt_pretrained: Callable[[dict, dict], dict] | None = None


class ClassifierWrapper(nn.Module):
    """Between the head's features and the classifiers: ``forward(features, classify, rows, size, **kwargs) ->
    (logits at feature resolution, extras)``. ``classify(features)`` runs every classifier, ``rows()`` returns the
    classifiers' weights as rows (C, channels), ``size`` is the input's (H, W); ``kwargs`` are the extra forward
    arguments of the model. ``state_key`` is the attribute name the model stores it under (its checkpoint keys)."""

    state_key = "wrapper"


HEADS = Registry("head")
CLASSIFIERS = Registry("classifier")
HEAD_LAYOUTS = Registry("head layout")
CLASSIFIER_WRAPPERS = Registry("classifier wrapper")
BLOCKS = Registry("residual block kind")
