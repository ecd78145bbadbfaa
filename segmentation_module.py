"""The incremental segmentation model: a backbone, a head and one classifier per step, assembled from registries.

Public API (see docs/architecture.md, "Model"):

* :class:`ModelSpec`: which parts make a model and their options: a backbone family (``models.BACKBONES``) with
  its options, a head (``modules.registry.HEADS``) reading a named backbone feature, per-step classifiers
  (``CLASSIFIERS``) in a layout (``HEAD_LAYOUTS``), optionally a classifier wrapper (``CLASSIFIER_WRAPPERS``);
  methods adjust it (``Method.model_spec``). Parts register from their own files.
* :func:`build_model_from_spec` / :func:`make_model` build the model and optionally load ImageNet weights into
  ``body``.
* :class:`IncrementalSegmentationModule` with ``forward``, ``fix_bn`` and parameter helpers (the weight transfer
  that initialises a new classifier lives with the methods: ``methods/transfer.py``).

The default parts (``resnet*`` backbone, ``deeplabv3`` head, ``conv1x1`` classifiers, ``per_step`` layout) are the
reference code's, state-dict keys included.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import BACKBONES
from models.resnet import load_pretrained_body
from modules.heads import final_layer, linear_classifier
from modules.norm import NORM_ACT, is_norm_layer
from modules.registry import CLASSIFIER_WRAPPERS, CLASSIFIERS, HEAD_LAYOUTS, HEADS, ShapeSpec
from utils.errors import UserError

__all__ = ["ModelSpec", "check_spec", "HEADS", "CLASSIFIERS", "HEAD_LAYOUTS", "CLASSIFIER_WRAPPERS", "ShapeSpec",
           "build_model_from_spec", "make_model", "IncrementalSegmentationModule", "load_pretrained_body"]


class IncrementalSegmentationModule(nn.Module):
    """``body`` -> named features -> ``head`` -> ``pre_logits`` -> ``cls[i]`` for every head, concatenated along
    channels.

    ``classes``: the label space, classes per step (``classes[0]`` includes the background); what ``predict`` maps
    the logits to. ``heads``: the output channels of each classifier, by default one head per step (``classes``).
    ``wrapper``: a classifier wrapper (``modules.registry.ClassifierWrapper``) between ``pre_logits`` and the
    classifiers, stored under its ``state_key``, or None."""

    def __init__(self, body: nn.Module, head: nn.Module, head_channels: int, classes: Sequence[int],
                 output_stride: int = 16, classifier: Callable[[int, int], nn.Module] = linear_classifier,
                 heads: Sequence[int] | None = None, wrapper: nn.Module | None = None):
        super().__init__()
        classes = [int(c) for c in classes]
        heads = classes if heads is None else [int(h) for h in heads]
        if not classes or any(c <= 0 for c in classes) or any(h <= 0 for h in heads):
            raise ValueError(f"classes and heads must be non-empty lists of positive counts, got {classes}, {heads}")
        if sum(heads) < sum(classes):
            raise ValueError(f"heads {heads} have fewer channels than the classes {classes}")
        self.body = body
        self.head = head
        self.head_channels = int(head_channels)
        self.classes = classes
        self.heads = heads
        self.output_stride = output_stride
        self.cls = nn.ModuleList([classifier(self.head_channels, h) for h in heads])
        self.wrapper_key = None
        if wrapper is not None:
            self.wrapper_key = wrapper.state_key
            self.add_module(wrapper.state_key, wrapper)
        self._bn_fixed = False

    @property
    def classifier_wrapper(self) -> nn.Module | None:
        return getattr(self, self.wrapper_key) if self.wrapper_key else None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ret_intermediate: bool = False, **wrapper_kwargs):
        """``(logits (B, C, H, W), extras)``: ``extras["pre_logits"]`` always, the wrapper's extras, and with
        ``ret_intermediate`` the backbone's ``"features"`` (dict), ``"body"`` (its deepest feature),
        ``"attentions"`` (its stage features, then ``pre_logits``) and ``"sem_logits_small"``. ``wrapper_kwargs`` go
        to the classifier wrapper (e.g. the classes a drop path keeps)."""
        features = self.body(x)
        pre_logits = self.head(features)
        head_extras = {}
        if isinstance(pre_logits, dict):  # a head with more than one output (maskformer: its queries)
            head_extras = {k: v for k, v in pre_logits.items() if k != "pre_logits"}
            pre_logits = pre_logits["pre_logits"]
        extras = {"pre_logits": pre_logits, **head_extras}
        wrapper = self.classifier_wrapper
        if wrapper is not None:
            sem_logits_small, more = wrapper(pre_logits, self._classify, self.classifier_rows, x.shape[-2:],
                                             **head_extras, **wrapper_kwargs)
            extras.update(more)
        elif wrapper_kwargs:
            raise TypeError(f"forward() got {sorted(wrapper_kwargs)} but the model has no classifier wrapper")
        else:
            sem_logits_small = self._classify(pre_logits)
        logits = F.interpolate(sem_logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if ret_intermediate:
            extras["features"] = features
            extras["body"] = features[self.body.out_feature]
            extras["attentions"] = [features[name] for name in self.body.stage_features] + [pre_logits]
            extras["sem_logits_small"] = sem_logits_small
        return logits, extras

    def _classify(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(features) for c in self.cls], dim=1)

    def classifier_rows(self) -> torch.Tensor:
        """The weights of every class's 1x1 classifier as rows (C, head_channels), classes in output order."""
        return torch.cat([final_layer(c).weight.flatten(1) for c in self.cls], dim=0)

    # ------------------------------------------------------------------ BN freezing
    def fix_bn(self) -> None:
        """Norm layers to eval mode and their affine parameters frozen; survives later ``train()`` calls."""
        self._bn_fixed = True
        for m in self.norm_layers():
            m.eval()
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)

    @property
    def bn_fixed(self) -> bool:
        return self._bn_fixed

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._bn_fixed:
            for m in self.norm_layers():
                m.eval()
        return self

    def norm_layers(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if is_norm_layer(m))

    # ------------------------------------------------------------------ parameter groups
    def body_params(self) -> Iterator[nn.Parameter]:
        return iter(self.body.parameters())

    def head_params(self) -> Iterator[nn.Parameter]:
        return iter(self.head.parameters())

    def classifier_params(self) -> Iterator[nn.Parameter]:
        return iter(self.cls.parameters())

    def old_classifier_params(self) -> Iterator[nn.Parameter]:
        """Parameters of ``cls[:-1]`` (classifiers of previous steps; empty at step 0)."""
        return (p for c in list(self.cls)[:-1] for p in c.parameters())

    def new_classifier_params(self) -> Iterator[nn.Parameter]:
        """Parameters of ``cls[-1]`` (the classifier of the current step)."""
        return iter(self.cls[-1].parameters())


Options = tuple  # ((name, value), ...): a part's options, sorted by name (frozen and comparable)


def as_options(options: dict) -> Options:
    return tuple(sorted(options.items()))


@dataclass(frozen=True)
class ModelSpec:
    """What a model is made of; the step's classes are given separately."""

    backbone: str = "resnet101"  # a key of models.BACKBONES
    norm_act: str = "iabn_sync"  # a key of modules.norm.NORM_ACT (backbones and heads of the reference layout)
    output_stride: int = 16  # one of the backbone family's strides
    head: str = "deeplabv3"  # a key of HEADS
    classifier: str = "conv1x1"  # a key of CLASSIFIERS
    pooling: int | None = 32  # image-pooling window of the reference head in evaluation
    head_layout: str = "per_step"  # a key of HEAD_LAYOUTS: output channels of each classifier
    head_channels: int = 256
    backbone_bn_momentum: float | None = None  # None: the family's default
    backbone_options: Options = ()  # keyword options of the family's build, e.g. (("block", "residual"),)
    head_in_feature: str | None = None  # the backbone feature the head reads (None: the backbone's out_feature)
    classifier_wrapper: str = ""  # a key of CLASSIFIER_WRAPPERS ("" none)
    wrapper_options: Options = ()  # keyword options of the wrapper's build
    aspp_rates: tuple[int, ...] | None = None  # dilations of a deeplabv3 head (None: from its feature's stride)
    head_options: Options = ()  # keyword options of the head's build, e.g. (("queries", 20),)

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def with_backbone_options(self, **options: Any) -> "ModelSpec":
        return self.replace(backbone_options=as_options({**dict(self.backbone_options), **options}))

    def with_wrapper(self, name: str, **options: Any) -> "ModelSpec":
        return self.replace(classifier_wrapper=name, wrapper_options=as_options(options))


def check_spec(spec: ModelSpec):
    """The backbone family of ``spec`` after checking every part name, the stride and the options."""
    family = BACKBONES.get_entry(spec.backbone, "--backbone")
    if spec.norm_act not in NORM_ACT:
        raise UserError(f"unknown --norm_act {spec.norm_act!r}; choose one of {', '.join(sorted(NORM_ACT))}")
    HEADS.get_entry(spec.head)
    CLASSIFIERS.get_entry(spec.classifier)
    HEAD_LAYOUTS.get_entry(spec.head_layout)
    if spec.classifier_wrapper:
        CLASSIFIER_WRAPPERS.get_entry(spec.classifier_wrapper)
    family.check(spec.backbone, spec.output_stride, dict(spec.backbone_options))
    return family


def build_model_from_spec(spec: ModelSpec, classes: Sequence[int],
                          pretrained_path: str | None = None) -> IncrementalSegmentationModule:
    """Backbone (+ ImageNet weights from ``pretrained_path``), head, wrapper, one classifier per head of the layout."""
    family = check_spec(spec)
    body = family.build(norm_act=spec.norm_act, output_stride=spec.output_stride,
                        bn_momentum=spec.backbone_bn_momentum, **dict(spec.backbone_options))
    if pretrained_path is not None:
        family.load_pretrained(body, pretrained_path)
    shapes = body.output_shape()
    in_feature = spec.head_in_feature or body.out_feature
    if in_feature not in shapes:
        raise UserError(f"the {spec.head} head reads feature {in_feature!r}, but --backbone {spec.backbone} gives "
                        f"{', '.join(shapes)}")
    head = HEADS[spec.head](spec, shapes, in_feature)
    wrapper = None
    needed = getattr(HEADS[spec.head], "wrapper", "")  # a head whose outputs only a given wrapper reads
    if needed and spec.classifier_wrapper not in ("", needed):
        raise UserError(f"the {spec.head} head needs the {needed} classifier wrapper, and this run's method adds "
                        f"{spec.classifier_wrapper}: use another head or method")
    name = spec.classifier_wrapper or needed
    if name:
        wrapper = CLASSIFIER_WRAPPERS[name](spec, list(classes), **dict(spec.wrapper_options))
    # a head that fuses several scales says at which stride it answers; a single-input head keeps its input's
    out_stride = getattr(head, "output_stride", shapes[in_feature].stride)
    return IncrementalSegmentationModule(body, head, spec.head_channels, classes, out_stride,
                                         classifier=CLASSIFIERS[spec.classifier],
                                         heads=HEAD_LAYOUTS[spec.head_layout](list(classes)), wrapper=wrapper)


def make_model(*, backbone: str, norm_act: str, output_stride: int, classes: Sequence[int],
               pooling: int | None = 32, pretrained_path: str | None = None, head_channels: int = 256,
               head: str = "deeplabv3", classifier: str = "conv1x1") -> IncrementalSegmentationModule:
    """:func:`build_model_from_spec` with the spec given as keywords; see docs/architecture.md."""
    spec = ModelSpec(backbone=backbone, norm_act=norm_act, output_stride=output_stride, head=head,
                     classifier=classifier, pooling=pooling, head_channels=head_channels)
    return build_model_from_spec(spec, classes, pretrained_path)
